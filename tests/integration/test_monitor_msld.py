"""Production monitoring on the real champion (issue 21, opt-in: ``-m slow``, ~10 min on 2
cores): an ImageNet EfficientNet-Lite0 champion is trained on MSLD, refitted on its non-test
photos and published as ``select`` publishes it, then served on 127.0.0.1; the held-out test
photos show no drift, darkened ones drift in the image statistics, and the non-skin images
drift in the guard's flag rate. Each verdict is asserted on ``pox monitor``'s JSON."""

from __future__ import annotations

import io
import json
import time
from datetime import datetime

import numpy as np
import pytest
import requests
from click.testing import CliRunner
from PIL import Image

from helpers.serve import running_service, write_serve_params
from helpers.suite import MSLD_DIR, requires_msld, tmp_overrides
from pox_pipeline.common.config import compose
from pox_pipeline.data.prepare import prepare
from pox_pipeline.guard import non_skin
from pox_pipeline.ops.cli import main as pox
from pox_pipeline.release import select
from pox_pipeline.training import evaluate, train

pytestmark = [pytest.mark.slow, requires_msld]

MODEL = "efficientnet_lite0"
MIN_ANSWERS = 20
WINDOW_MARGIN_S = 3  # `pox monitor --since` reaches this far before a case's first request


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8)).save(buffer, "JPEG",
                                                                           quality=95)  # fmt: skip
    return buffer.getvalue()


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The champion trained, published and served; each case posted in its own window and
    `pox monitor` run on it; case -> drift.json's entry for the champion."""
    root = tmp_path_factory.mktemp("msld-monitor")
    overrides = [
        *tmp_overrides(root), "data=msld", f"data.raw_dir={MSLD_DIR}", "data.image_size=224",
        f"models=[{MODEL}]", "train.verbose=0", "publish.backends=[tflite_fp32]",
    ]  # fmt: skip
    cfg = compose(overrides)
    prepare(cfg)
    train.train(cfg, MODEL)
    evaluate.evaluate(cfg, MODEL)
    version = select.select(cfg)["bentoml_tag"].split(":")[1]
    served_dir = root / "served-monitoring"
    params = write_serve_params(root / "params.yaml", *overrides,
                                f"serve.monitoring.dir={served_dir}",
                                "serve.monitoring.timestamp_resolution=1s")  # fmt: skip
    test_photos = sorted((root / "datas" / "prepared" / "test").rglob("*.png"))
    originals = {p.stem: p for p in MSLD_DIR.rglob("*.jpg")}
    held_out = [np.asarray(Image.open(originals[p.stem]).convert("RGB"), np.float32)
                for p in test_photos]  # fmt: skip
    cases = {
        "held_out": [originals[p.stem].read_bytes() for p in test_photos],
        "darkened": [jpeg(pixels * 0.6) for pixels in held_out],
        "non_skin": [jpeg(np.asarray(image.convert("RGB"), np.float32))
                     for _, _, image in non_skin.images()],
    }  # fmt: skip
    found = {}
    with running_service(params, root / "server.log") as url:
        for case, photos in cases.items():
            time.sleep(WINDOW_MARGIN_S + 1)  # no answer of the case before inside the margin
            start = datetime.now()
            for data in photos:
                answer = requests.post(f"{url}/predict", timeout=120,
                                       files={"image": ("photo.jpg", data, "image/jpeg")})
                assert answer.status_code == 200, answer.text
            # `pox monitor` as an operator runs it, over a window holding this case alone
            minutes = ((datetime.now() - start).total_seconds() + WINDOW_MARGIN_S) / 60
            out = root / "monitoring" / case
            result = CliRunner().invoke(
                pox, ["monitor", "--dir", str(served_dir), "--since", f"{minutes:.2f}m",
                      "--min-answers", str(MIN_ANSWERS), "--out", str(out)],
                env={"POX_PARAMS": str(params)},
            )  # fmt: skip
            report = json.loads((out / "drift.json").read_text())
            [model] = [m for m in report["models"] if m["model_version"] == version]
            assert model["answers"] == len(photos), (case, result.output)
            print(result.output)  # -s shows each table
            found[case] = model
    return found


def drifted(model: dict) -> set[str]:
    return {test["column"] for test in model["tests"] if test["drift"]}


def test_the_champions_own_test_photos_show_no_drift(reports: dict[str, dict]) -> None:
    assert reports["held_out"]["status"] == "no drift", reports["held_out"]


def test_darkened_photos_drift_in_the_image_statistics(reports: dict[str, dict]) -> None:
    assert reports["darkened"]["status"] == "drift"
    assert {"brightness", "red_mean"} <= drifted(reports["darkened"])


def test_non_skin_images_drift_in_the_guards_flag_rate(reports: dict[str, dict]) -> None:
    assert "in_distribution" in drifted(reports["non_skin"])
