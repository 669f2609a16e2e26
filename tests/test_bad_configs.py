"""Bad training configs and presets: unknown keys, wrong types, zero/negative steps, rank larger than a layer.
Each is a ``ConfigError`` naming the key and the value, from a dict, from a preset file and from the CLI."""

from __future__ import annotations

import json

import pytest

import bad_inputs as B
from lora_studio.cli.main import main as cli_main
from lora_studio.errors import ConfigError
from lora_studio.train.config import TrainConfig, load_preset


@pytest.mark.parametrize("case", B.CONFIG_CASES)
def test_bad_settings_from_a_dict(case):
    data, words = B.CONFIG_CASES[case]
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(data)
    B.assert_helpful(info.value, words) if case != "not_an_object" else B.assert_helpful(info.value, words[:0])


@pytest.mark.parametrize("case", [c for c in B.CONFIG_CASES if c != "nan_lr"])  # JSON has no NaN
def test_bad_settings_from_a_preset_file(case, tmp_path):
    data, words = B.CONFIG_CASES[case]
    preset = tmp_path / f"{case}.json"
    preset.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        load_preset(str(preset))
    assert preset.name in str(info.value)
    for options in words:
        assert any(w.lower() in str(info.value).lower() for w in options), str(info.value)


def test_preset_that_is_not_json_or_not_there(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"steps": 10,')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_preset(str(broken))
    with pytest.raises(ConfigError, match="not found") as info:
        load_preset("no-such-preset")
    assert "demo-cpu" in str(info.value)  # it lists what is available
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"description": "caf\xe9"}'.encode("cp1252"))
    with pytest.raises(ConfigError) as info:
        load_preset(str(latin))
    B.assert_helpful(info.value, (("latin.json",),))


def test_cli_reports_bad_settings_and_exits_2(tmp_path, capsys):
    """The CLI prints the message (no traceback) and exits 2, for --set, --steps and a config file."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"steps": 10, "rnak": 4}))
    for argv, words in ((["train", "--preset", "demo-cpu", "--set", "stepz=3", "--print-config"], ["stepz"]),
                        (["train", "--preset", "demo-cpu", "--steps", "0", "--print-config"], ["steps = 0"]),
                        (["train", "--preset", "demo-cpu", "--set", "rank=\"big\"", "--print-config"], ["rank"]),
                        (["train", "--config", str(bad), "--print-config"], ["rnak"])):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        assert all(w in err for w in words), err


def test_output_name_outside_the_run_folder_is_refused_by_the_cli(tmp_path, capsys, demo_dataset):
    """``--output-name ../../evil`` was written two folders above the run folder; now it is refused like a
    ``--run-name`` with a slash, before anything loads or is written."""
    out = tmp_path / "a" / "b"
    for flag, name in (("--output-name", "../../evil"), ("--output-name", "sub/evil"), ("--run-name", "..")):
        assert cli_main(["train", "--preset", "demo-cpu", "--data", str(demo_dataset), "--output-dir", str(out),
                         "--steps", "1", flag, name]) == 2
        err = capsys.readouterr().err
        assert "must be a plain name" in err and repr(name) in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*"))


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "..", ".hidden", "C:evil", "NUL", "tab\tname",
                                  "x" * 151])
def test_one_name_rule_for_config_and_gui(tmp_path, name):
    """Run names, LoRA output names and the GUI's export names go through one rule (lora_studio.names)."""
    from lora_studio.errors import InputFileError
    from lora_studio.ui.paths import PathPolicy

    for key in ("run_name", "output_name"):
        with pytest.raises(ConfigError, match="must be a plain name"):
            TrainConfig.from_dict({key: name})
    with pytest.raises(InputFileError, match="must be a plain name"):
        PathPolicy(tmp_path).output(name, "exports", ".safetensors")
    for good in ("my style v2", "café-lora", "a..b"):
        assert TrainConfig.from_dict({"output_name": good}).resolved_output_name() == good
        assert PathPolicy(tmp_path).output(good, "exports").name == good


def test_rank_larger_than_the_layer_is_refused_before_training(tmp_path, demo_dataset):
    """The demo UNet's attention layers are 32 and 64 wide: rank 48 cannot fit the 32-wide ones. The error comes
    before any step runs and leaves the pipeline as it was."""
    import torch
    from lora_factories import demo_or_random_pipeline
    from lora_studio.train.trainer import train

    pipe = demo_or_random_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cfg = load_preset("demo-cpu").replace(data_dir=str(demo_dataset), output_dir=str(tmp_path), rank=48, steps=2)
    with pytest.raises(ConfigError) as info:
        train(cfg, pipeline=pipe)
    B.assert_helpful(info.value, (("rank = 48",), ("32",), ("lower rank",)))
    after = pipe.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_bad_mix_presets(tmp_path):
    from lora_studio.mix.presets import load_mix_preset

    latin = tmp_path / "latin.json"
    latin.write_bytes('{"loras": [], "prompt": "caf\xe9"}'.encode("cp1252"))
    with pytest.raises(ConfigError) as info:
        load_mix_preset(str(latin))
    B.assert_helpful(info.value, (("utf-8",),), latin)
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"loras": [], "zzz": 1}')
    with pytest.raises(ConfigError, match="'zzz'"):
        load_mix_preset(str(unknown))
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"loras": [{"file": "a.safetensors", "strength": "strong"}]}')
    with pytest.raises(ConfigError, match="strength"):
        load_mix_preset(str(wrong))
