"""Seeing training: TensorBoard curves, validation loss (held-out pictures, fixed noise and timesteps),
validation.csv and best.json, equal across runs and across a stop + resume; trackers that are not installed."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

import bad_inputs as B
from train_configs import tiny_config
from lora_studio.cli.main import main as cli_main
from lora_studio.demo import make_demo_dataset, random_demo_pipeline
from lora_studio.errors import ConfigError, DatasetError
from lora_studio.fileio import load_safetensors
from lora_studio.progress import StopFlag
from lora_studio.train.config import TrainConfig
from lora_studio.train.dataset import scan_images
from lora_studio.train.trainer import TrainCallbacks, train
from lora_studio.train import validation as V
from train_threads import one_torch_thread  # noqa: F401  (autouse: one torch thread)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("tiny-data"), count=4, repeats=2)


def _cfg(data, out, **kw) -> TrainConfig:
    return tiny_config(data, out, **{"alpha": 4.0, "seed": 3, "validation_split": 0.25, **kw})


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_held_out_pictures_are_not_trained_on(tiny_data, tmp_path, monkeypatch):
    items = scan_images(tiny_data)
    kept, held = V.split_items(items, 0.25, seed=3)
    assert len(held) == 1 and len(kept) == 3
    assert {it.path for it in kept}.isdisjoint({it.path for it in held})
    assert V.split_items(items, 0.25, seed=3) == (kept, held)                  # the seed decides, every time
    assert V.split_items(items, 0.0, seed=3) == (items, [])
    with pytest.raises(DatasetError, match="validation_split"):
        V.split_items(items, 0.9, seed=3)

    seen = []                                                # every picture a training batch draws
    import lora_studio.train.trainer as T

    class Spy(T.BucketBatches):
        def batch(self, micro_index):
            epoch, idx = super().batch(micro_index)
            seen.extend(self.items[i].path for i in idx)
            return epoch, idx
    monkeypatch.setattr(T, "BucketBatches", Spy)
    result = train(_cfg(tiny_data, tmp_path, steps=4), pipeline=random_demo_pipeline())
    assert seen and held[0].path not in seen
    assert set(seen) == {it.path for it in kept}
    meta = load_safetensors(result.lora_path)[1]
    assert meta["ss_num_train_images"] == str(sum(it.repeats for it in kept))


def test_validation_loss_is_fixed_and_reproducible(tiny_data, tmp_path):
    """The same weights score the same twice; two runs with one seed write the same validation.csv; the best
    step is named in best.json with a LoRA file that exists."""
    a = train(_cfg(tiny_data, tmp_path, run_name="a", validate_every_n_steps=1), pipeline=random_demo_pipeline())
    b = train(_cfg(tiny_data, tmp_path, run_name="b", validate_every_n_steps=1), pipeline=random_demo_pipeline())
    rows_a, rows_b = _rows(a.run_dir / "validation.csv"), _rows(b.run_dir / "validation.csv")
    assert rows_a[0] == ["step", "validation_loss"] and [r[0] for r in rows_a[1:]] == ["1", "2", "3"]
    assert rows_a == rows_b
    best = json.loads((a.run_dir / "best.json").read_text())
    values = {int(s): float(v) for s, v in rows_a[1:]}
    assert len(set(values.values())) == 3                                      # it follows the weights
    assert best["validation_loss"] == min(values.values()) and values[best["step"]] == best["validation_loss"]
    assert (a.run_dir / best["lora"]).is_file()
    assert a.losses == b.losses                                                # validation changes no training

    plain = train(_cfg(tiny_data, tmp_path, run_name="plain"), pipeline=random_demo_pipeline())
    assert plain.losses == a.losses                     # scoring every step draws nothing from the training RNG
    assert [r[0] for r in _rows(plain.run_dir / "validation.csv")[1:]] == ["3"]   # no cadence: at the end only
    x, y = load_safetensors(plain.lora_path)[0], load_safetensors(a.lora_path)[0]
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_two_evaluations_of_the_same_weights_agree(tiny_data, tmp_path, monkeypatch):
    scores = []
    real = V.Validator.__call__

    def twice(self, unet, modules, accelerator):
        first, second = real(self, unet, modules, accelerator), real(self, unet, modules, accelerator)
        scores.append((first, second))
        assert all(m.training for m in modules)                                # put back in training mode
        return first
    monkeypatch.setattr(V.Validator, "__call__", twice)
    train(_cfg(tiny_data, tmp_path, steps=2, validate_every_n_steps=1, lora_dropout=0.2),
          pipeline=random_demo_pipeline())
    assert len(scores) == 2 and all(f == s for f, s in scores)


def test_stop_then_resume_gives_the_same_lora_and_validation(tiny_data, tmp_path):
    knobs = dict(steps=4, validate_every_n_steps=1, lora_dropout=0.1, shuffle_tags=True)
    full = train(_cfg(tiny_data, tmp_path, run_name="full", **knobs), pipeline=random_demo_pipeline())
    stop = StopFlag()
    cb = TrainCallbacks(on_step=lambda step, loss: stop.request() if step == 2 else None)
    cfg = _cfg(tiny_data, tmp_path, run_name="parts", **knobs)
    first = train(cfg, stop=stop, callbacks=cb, pipeline=random_demo_pipeline())
    assert first.stopped and len(_rows(first.run_dir / "validation.csv")) == 3
    second = train(cfg.replace(resume=True), pipeline=random_demo_pipeline())
    assert second.losses == full.losses
    a, b = load_safetensors(full.lora_path)[0], load_safetensors(second.lora_path)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(full.run_dir / "validation.csv") == _rows(second.run_dir / "validation.csv")
    best_full = json.loads((full.run_dir / "best.json").read_text())
    best_parts = json.loads((second.run_dir / "best.json").read_text())
    assert best_full["step"] == best_parts["step"] and best_full["validation_loss"] == best_parts["validation_loss"]


def test_tensorboard_event_files_hold_loss_and_lr(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(_cfg(tiny_data, tmp_path, log_with="tensorboard", validate_every_n_steps=2),
                   pipeline=random_demo_pipeline())
    logs = result.run_dir / "logs"
    events = [p for p in logs.rglob("events.out.tfevents.*") if p.stat().st_size > 0]
    assert events
    acc = EventAccumulator(str(logs))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "validation/loss"} <= tags, tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx(result.losses, rel=1e-6)
    assert [e.step for e in acc.Scalars("validation/loss")] == [2, 3]
    assert (result.run_dir / "loss.csv").is_file() and (result.run_dir / "loss.png").is_file()  # kept as before


def test_cli_prints_how_to_open_the_curves(tiny_data, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    argv = ["train", "--data", str(tiny_data), "--base", "demo", "--output-dir", str(tmp_path), "--run-name", "r",
            "--steps", "1", "--resolution", "64", "--rank", "2", "--batch-size", "2", "--log-with", "tensorboard",
            "--set", "min_bucket_reso=32", "--set", "bucket_reso_step=8", "--threads", "1"]
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    assert f"tensorboard --logdir {tmp_path / 'r' / 'logs'}" in err


def test_wandb_without_the_package_is_a_clear_error(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)   # as if not installed (and never the network)
    with pytest.raises(ConfigError) as info:
        train(_cfg(tiny_data, tmp_path, log_with="wandb"), pipeline=random_demo_pipeline())
    B.assert_helpful(info.value, (("wandb",), ("pip install wandb",)))
    assert not (tmp_path / "run").exists()
    assert cli_main(["train", "--data", str(tiny_data), "--output-dir", str(tmp_path), "--log-with", "wandb"]) == 2
    assert "pip install wandb" in capsys.readouterr().err


def test_tensorboard_without_the_package_is_a_clear_error(tiny_data, tmp_path, monkeypatch):
    for name in ("tensorboard", "tensorboardX"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        train(_cfg(tiny_data, tmp_path, log_with="tensorboard"), pipeline=random_demo_pipeline())


def test_validation_dir_and_its_checks(tiny_data, tmp_path):
    val = make_demo_dataset(tmp_path / "val", count=2, repeats=1)
    result = train(_cfg(tiny_data, tmp_path, validation_split=0.0, validation_dir=str(val), steps=2),
                   pipeline=random_demo_pipeline())
    assert [r[0] for r in _rows(result.run_dir / "validation.csv")[1:]] == ["2"]
    without = train(_cfg(tiny_data, tmp_path, run_name="none", validation_split=0.0, steps=2),
                    pipeline=random_demo_pipeline())
    assert without.losses == result.losses and not (without.run_dir / "validation.csv").exists()
    with pytest.raises(DatasetError, match="outside data_dir"):
        train(_cfg(tiny_data, tmp_path, validation_split=0.0, validation_dir=str(tiny_data)),
              pipeline=random_demo_pipeline())
