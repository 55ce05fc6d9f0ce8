"""The baseline the BentoML service is measured against: a Flask app that calls
``model.predict`` once per request, as the tutorial's web app did.

Same model file, same preprocessing and the same JSON as the service, so the difference
measured is the serving (compiled call, adaptive batching, worker split), nothing else.

    python benchmarks/naive_server.py --bento-tag pox-classifier:latest --port 5000
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flask import Flask, jsonify, request

from pox_pipeline.common import preprocess
from pox_pipeline.models import inference
from pox_pipeline.serving.policy import DecisionPolicy


def create_app(bento_tag: str) -> Flask:
    """The app for a model of the BentoML store (found through ``$BENTOML_HOME``)."""
    import bentoml

    stored = bentoml.models.get(bento_tag)
    policy = DecisionPolicy.from_stored(stored)
    model = inference.load_stored_model(Path(stored.path))
    app = Flask(__name__)

    @app.get("/readyz")
    def readyz():
        return "ok"

    @app.post("/predict")
    def predict():
        try:
            image = preprocess.preprocess_bytes(
                request.files["image"].read(), policy.image_size, policy.resample
            )
        except (KeyError, preprocess.ImageError) as error:
            return jsonify({"error": str(error)}), 400
        outputs = model.predict(image[None], verbose=0)
        return jsonify(policy.results(outputs)[0])

    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bento-tag", required=True, help="BentoML model, e.g. pox-classifier:latest"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # Flask's own server, threaded as by default: what a tutorial app runs in production.
    create_app(args.bento_tag).run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
