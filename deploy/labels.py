"""The image's OCI labels, one ``key=value`` a line: ``python deploy/labels.py BENTO_TAG
GIT_COMMIT`` (``make container``). Which Bento and source commit, and which model, registry
version and MLflow run it serves."""

from __future__ import annotations

import sys

import bentoml

PREFIX = "io.pox-pipeline"


def image_labels(bento_tag: str, revision: str) -> dict[str, str]:
    bento = bentoml.get(bento_tag)
    (model_tag,) = (model.tag for model in bento.info.models)
    metadata = bentoml.models.get(model_tag).info.metadata
    return {
        "org.opencontainers.image.title": bento.tag.name,
        "org.opencontainers.image.version": bento.tag.version,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.created": bento.info.creation_time.isoformat(),
        f"{PREFIX}.model": str(model_tag),
        f"{PREFIX}.model.registered_name": str(metadata.get("registered_model_name")),
        f"{PREFIX}.model.registered_version": str(metadata.get("mlflow_model_version")),
        f"{PREFIX}.model.mlflow_run_id": str(metadata.get("mlflow_run_id")),
        f"{PREFIX}.model.git_commit": str(metadata.get("git_commit")),
    }


if __name__ == "__main__":
    for key, value in image_labels(*sys.argv[1:3]).items():
        print(f"{key}={value}")
