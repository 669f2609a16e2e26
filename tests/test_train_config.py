"""TrainConfig: presets load, bad settings are refused with a message naming the key and the value."""

from __future__ import annotations

import json

import pytest

from lora_studio.errors import ConfigError
from lora_studio.train.config import PRESETS_DIR, TrainConfig, list_presets, load_preset


TRAIN_PRESETS = [name for name in list_presets() if not name.startswith("mix")]  # as the GUI lists them


def test_the_training_presets_are_found():
    assert {"demo-cpu", "style-sd15", "style-sd15-fast", "style-sdxl"} <= set(TRAIN_PRESETS)


@pytest.mark.parametrize("name", TRAIN_PRESETS)
def test_shipped_presets_load(name):
    cfg = load_preset(name)
    assert isinstance(cfg, TrainConfig)
    raw = json.loads((PRESETS_DIR / f"{name}.json").read_text())
    for key, value in raw.items():  # every key of the file reached the dataclass unchanged
        assert getattr(cfg, key) == value


def test_round_trip_through_json(tmp_path):
    cfg = TrainConfig(data_dir="d", rank=8, alpha=4.0, target_modules=["to_q", "ff.net.2"], resume="x/state")
    path = tmp_path / "c.json"
    cfg.to_json(path)
    assert TrainConfig.from_json(path) == cfg


@pytest.mark.parametrize("data, words", [
    ({"rnak": 4}, ["'rnak'", "unknown"]),
    ({"steps": 0}, ["steps", "0", "positive"]),
    ({"steps": -5}, ["steps", "-5"]),
    ({"rank": 0}, ["rank", "0"]),
    ({"alpha": 0}, ["alpha"]),
    ({"learning_rate": -1e-4}, ["learning_rate", "-0.0001"]),
    ({"rank": "8"}, ["rank", "'8'", "whole number"]),
    ({"rank": 4.5}, ["rank", "4.5"]),
    ({"train_text_encoder": 1}, ["train_text_encoder", "true or false"]),
    ({"target_modules": "to_q"}, ["target_modules", "list of strings"]),
    ({"optimizer": "sgd"}, ["optimizer", "'sgd'", "adamw"]),
    ({"mixed_precision": "fp8"}, ["mixed_precision", "'fp8'"]),
    ({"caption_dropout_rate": 1.0}, ["caption_dropout_rate", "[0, 1)"]),
    ({"resolution": 100}, ["resolution", "multiple of 8"]),
    ({"min_bucket_reso": 512, "max_bucket_reso": 256}, ["min_bucket_reso", "max_bucket_reso"]),
    ({"target_modules": []}, ["target_modules", "empty"]),
    ({"init": "pissa", "use_dora": True}, ["pissa", "use_dora"]),
    ({"run_name": "../x"}, ["run_name", "'../x'"]),
])
def test_bad_settings_are_named(data, words):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(data)
    for word in words:
        assert word in str(err.value)


def test_integral_float_is_accepted_as_int_and_int_as_float():
    cfg = TrainConfig.from_dict({"steps": 10.0, "alpha": 4})
    assert cfg.steps == 10 and isinstance(cfg.steps, int)
    assert cfg.alpha == 4.0 and isinstance(cfg.alpha, float)


def test_preset_errors(tmp_path):
    with pytest.raises(ConfigError, match="no-such-preset.*Available presets: .*demo-cpu"):
        load_preset("no-such-preset")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_preset("broken", presets_dir=tmp_path)
    (tmp_path / "typo.json").write_text(json.dumps({"stepz": 3}))
    with pytest.raises(ConfigError, match="typo.json.*'stepz'"):
        load_preset("typo", presets_dir=tmp_path)


def test_replace_checks_and_names():
    cfg = TrainConfig(data_dir="/data/10_my style!")
    assert cfg.resolved_run_name() == "10_my-style"
    assert cfg.replace(run_name="r1").run_dir().as_posix() == "outputs/r1"
    with pytest.raises(ConfigError, match="rank"):
        cfg.replace(rank=-1)
