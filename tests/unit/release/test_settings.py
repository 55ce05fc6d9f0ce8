"""What publishing reads is ``publish:`` (issue 28 moved it out of ``serve:``, which the service
reads). The old ``serve.*`` keys keep working for one release, from a composed override
(``dvc exp run -S serve.publish_backends=...``) or from a params file written before the
rename, with a FutureWarning that names the new key; both set, differently, is an error."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from pox_pipeline.common.config import compose, write_params
from pox_pipeline.common.deprecated import UNSET, moved_keys
from pox_pipeline.common.params import load_params
from pox_pipeline.release.settings import PublishConfig, guard_config
from pox_pipeline.serving.settings import ServeConfig

# each deprecated override and the new one it stands for
OLD_AND_NEW = {
    "serve.publish_backends=[tflite_fp32]": "publish.backends=[tflite_fp32]",
    "serve.backend_check.calibration_images=7": "publish.backend_check.representative_photos=7",
    "serve.backend_check.min_label_agreement=0.5": "publish.backend_check.min_label_agreement=0.5",
    "serve.ood.enabled=false": "publish.guard.fit=false",
    "serve.ood.spaces=[head]": "publish.guard.spaces=[head]",
    "serve.ood.k=3": "publish.guard.k=3",
    "serve.monitoring.components=4": "publish.monitoring_components=4",
}


def test_publish_reads_its_own_section_without_a_warning() -> None:
    cfg = compose()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = PublishConfig.from_cfg(cfg)
    assert config.backends == tuple(cfg.publish.backends)
    check = cfg.publish.backend_check
    assert config.backend_check.representative_photos == check.representative_photos
    assert config.fit_guard and config.guard.k == cfg.publish.guard.k
    assert config.monitoring_components == cfg.publish.monitoring_components
    assert config.served_backend == cfg.serve.backend and config.monitored
    # the deprecated keys stay in conf/ (so an override of one is accepted), unset
    assert OmegaConf.is_missing(cfg.serve, "publish_backends")
    assert OmegaConf.is_missing(cfg.serve.ood, "enabled")
    with pytest.raises(ValueError, match="no TFLite backends"):
        PublishConfig.from_cfg(compose(["publish.backends=[onnx]"]))


def test_an_old_override_still_works_with_a_warning_naming_the_new_key() -> None:
    expected = PublishConfig.from_cfg(compose(list(OLD_AND_NEW.values())))
    with pytest.warns(FutureWarning) as caught:
        got = PublishConfig.from_cfg(compose(list(OLD_AND_NEW)))
    assert got == expected
    [message] = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    for old, new in OLD_AND_NEW.items():
        assert f"{old.split('=')[0]} -> {new.split('=')[0]}" in message
    assert not got.fit_guard and got.guard.spaces == ("head",) and got.backends == ("tflite_fp32",)
    with pytest.warns(FutureWarning, match="serve.ood.k -> publish.guard.k"):
        assert guard_config(compose(["serve.ood.k=3"]))[1].k == 3


def test_dvc_exp_run_set_of_an_old_key_publishes_as_the_new_key(tmp_path: Path) -> None:
    """``dvc exp run -S serve.ood.enabled=false`` composes with DVC's own function, as
    ``write_params`` does: publishing and the service both read the old switch."""
    params = write_params(tmp_path / "params.yaml", ["serve.ood.enabled=false"])
    cfg = load_params(params)
    with pytest.warns(FutureWarning, match="serve.ood.enabled -> publish.guard.fit"):
        assert PublishConfig.from_cfg(cfg).fit_guard is False
    with pytest.warns(FutureWarning, match="serve.ood.enabled -> serve.guard_enabled"):
        assert ServeConfig.from_cfg(cfg.serve, tmp_path).guard_enabled is False


def test_a_params_file_from_before_the_rename_publishes_the_same(tmp_path: Path) -> None:
    new = OmegaConf.to_container(compose(list(OLD_AND_NEW.values())), resolve=True)
    old = {key: value for key, value in new.items() if key != "publish"}
    guard = dict(new["publish"]["guard"])
    check = dict(new["publish"]["backend_check"])
    old["serve"] |= {
        "publish_backends": new["publish"]["backends"],
        "backend_check": {**check, "calibration_images": check.pop("representative_photos")},
        "ood": {**guard, "enabled": guard.pop("fit")},
        "monitoring": {**new["serve"]["monitoring"],
                       "components": new["publish"]["monitoring_components"]},
    }  # fmt: skip
    del old["serve"]["guard_enabled"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(old))
    with pytest.warns(FutureWarning, match="serve.publish_backends -> publish.backends"):
        got = PublishConfig.from_cfg(load_params(path))
    assert got == PublishConfig.from_cfg(compose(list(OLD_AND_NEW.values())))


def test_an_old_and_a_new_key_that_differ_are_an_error() -> None:
    both = compose(["serve.publish_backends=[tflite_fp32]", "publish.backends=[tflite_int8]"])
    with pytest.raises(ValueError, match="both set and differ: set only publish.backends"):
        PublishConfig.from_cfg(both)
    with pytest.raises(ValueError, match="set only publish.guard.alpha"):
        guard_config(compose(["serve.ood.alpha=0.1", "publish.guard.alpha=0.2"]))
    with pytest.warns(FutureWarning):  # the same value twice: no conflict
        PublishConfig.from_cfg(compose(["serve.ood.k=3", "publish.guard.k=3"]))


def test_moved_keys_takes_only_set_old_keys_and_leaves_its_input_alone() -> None:
    section = {"guard": {"k": 5}}
    params = {"serve": {"ood": {"k": UNSET, "alpha": None}}}
    moves = {"serve.ood.k": "guard.k", "serve.ood.alpha": "guard.alpha", "serve.x": "x"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing set: nothing moved, no warning
        assert moved_keys(section, "publish", moves, params) == section
    params["serve"]["ood"]["alpha"] = 0.1
    with pytest.warns(FutureWarning, match=r"serve.ood.alpha -> publish.guard.alpha\."):
        moved = moved_keys(section, "publish", moves, params)
    assert moved == {"guard": {"k": 5, "alpha": 0.1}} and section == {"guard": {"k": 5}}
