"""Seeing training: loss, learning-rate and validation curves to TensorBoard or Weights & Biases (through
accelerate's trackers), and the validation history a run folder keeps (``validation.csv``, ``best.json``).

TensorBoard event files go to ``<run>/logs``; loss.csv and loss.png are written as before, whatever the tracker.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from ..fileio import write_text_atomic
from .config import TrainConfig

# tracker -> (modules that provide it, the package to install)
_NEEDS = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb")}


def check_log_with(log_with: str) -> None:
    """Refuse a tracker whose package is not installed, naming the package."""
    if log_with == "none":
        return
    modules, package = _NEEDS[log_with]
    if not any(_installed(m) for m in modules):
        raise ConfigError(f"log_with = {log_with!r} needs the {package} package, which is not installed. Install it "
                          f"(pip install {package}) or use log_with 'none' (loss.csv and loss.png are written anyway).")


def _installed(module: str) -> bool:
    import sys

    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def logs_dir(cfg: TrainConfig) -> Path:
    return cfg.run_dir() / "logs"


def accelerator_kwargs(cfg: TrainConfig) -> dict:
    """``Accelerator(**these)``: the tracker and where it writes (TensorBoard: ``<run>/logs``)."""
    if cfg.log_with == "none":
        return {}
    from accelerate.utils import ProjectConfiguration

    run = str(cfg.run_dir())
    return {"log_with": cfg.log_with, "project_config": ProjectConfiguration(project_dir=run, logging_dir=run)}


def open_hint(cfg: TrainConfig) -> str:
    """How to look at the curves while the run trains ("" without a tracker)."""
    if cfg.log_with == "tensorboard":
        return f"training curves: tensorboard --logdir {logs_dir(cfg)}"
    if cfg.log_with == "wandb":
        return f"training curves: Weights & Biases project 'lora-studio', run '{cfg.resolved_run_name()}'"
    return ""


class Curves:
    """What the trainer reports per step and per validation: to the tracker, ``validation.csv`` and ``best.json``.

    ``history`` (step, validation loss) is saved in the training state, so a resumed run writes the same files.
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path, accelerator) -> None:
        self.cfg, self.run_dir, self.accelerator = cfg, Path(run_dir), accelerator
        self.history: list[list] = []

    def start(self) -> str:
        """Open the tracker (after the run folder exists); returns the hint on how to see the curves."""
        if self.cfg.log_with == "none":
            return ""
        settings = {k: v for k, v in self.cfg.to_dict().items() if isinstance(v, (bool, int, float, str))}
        project = "logs" if self.cfg.log_with == "tensorboard" else "lora-studio"
        kwargs = {"wandb": {"name": self.cfg.resolved_run_name(), "dir": str(self.run_dir)}}
        self.accelerator.init_trackers(project, config=settings, init_kwargs=kwargs)
        return open_hint(self.cfg)

    def restore(self, history: list) -> None:
        self.history = [[int(s), float(v)] for s, v in history]

    def log_step(self, step: int, loss: float, lr: float) -> None:
        if self.cfg.log_with != "none":
            self.accelerator.log({"train/loss": loss, "train/lr": lr}, step=step)

    def validated(self, step: int, value: float, lora_file: Callable[[], Path]) -> bool:
        """Record a validation loss; when it is the best so far, ``lora_file()`` (the LoRA of this step) is
        named in ``best.json``. Returns whether it was the best."""
        best = all(value < v for _, v in self.history)
        self.history = [h for h in self.history if h[0] < step] + [[step, value]]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["step", "validation_loss"])
        w.writerows([s, repr(v)] for s, v in self.history)
        write_text_atomic(self.run_dir / "validation.csv", buf.getvalue())
        if self.cfg.log_with != "none":
            self.accelerator.log({"validation/loss": value}, step=step)
        if best:
            info = {"step": step, "validation_loss": value, "lora": lora_file().name}
            write_text_atomic(self.run_dir / "best.json", json.dumps(info, indent=1) + "\n")
        return best
