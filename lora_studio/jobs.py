"""Background training jobs that a UI polls: start, stop, snapshot, reattach by job id.

``train()`` blocks for minutes; a web page must stay responsive and survive a reload. A ``TrainJob`` runs
``train(config, progress, stop, callbacks)`` in a daemon thread and records what a page shows: step / total,
steps per second, ETA, the loss of every step, the sample grids written so far, log lines and, at the end,
the LoRA file or the error message. ``snapshot()`` returns a consistent copy under a lock, so a poller never
sees half an update. Jobs live in a ``JobRegistry`` keyed by job id (the only shared state of the GUI): a
reloaded page asks ``registry.current()`` for the running (or latest) job and shows it again.

Errors are never swallowed: a ``LoraStudioError`` becomes the job's ``error`` (its message is written for
users); anything else is a bug, so its traceback goes to the log and to stderr and ``error`` says so.
This module knows nothing about gradio.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, LoraStudioError, TrainingError
from .progress import ProgressEvent, StopFlag
from .train.config import TrainConfig
from .train.trainer import TrainCallbacks
from .train.trainer import train

LOG_LINES = 400          # log lines kept per job (the newest)
FINISHED = ("done", "stopped", "error")

Trainer = Callable[..., Any]  # train(config, progress, stop, callbacks, pipeline=None) -> TrainResult


@dataclass
class JobSnapshot:
    """What a page shows about one job at one moment (a copy: safe to keep and format)."""

    job_id: str
    state: str                          # "starting" | "running" | "stopping" | "done" | "stopped" | "error"
    step: int
    total: int
    started_at: float
    elapsed_s: float
    it_per_s: float | None              # optimizer steps per second over this run (None until 1 step is done)
    eta_s: float | None
    losses: list[tuple[int, float]] = field(default_factory=list)   # (step, loss) of every step seen
    samples: list[Path] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    lora_path: Path | None = None
    run_dir: Path | None = None
    error: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0

    def status_line(self) -> str:
        """One line for a progress label: "running: step 12/60 (20%), 1.85 it/s, ETA 26 s, loss 0.1234"."""
        parts = [f"{self.state}: step {self.step}/{self.total} ({self.fraction * 100:.0f}%)"]
        if self.it_per_s is not None:
            parts.append(f"{self.it_per_s:.2f} it/s")
        if self.eta_s is not None and not self.finished:
            parts.append(f"ETA {format_seconds(self.eta_s)}")
        else:
            parts.append(f"elapsed {format_seconds(self.elapsed_s)}")
        if self.losses:
            parts.append(f"loss {self.losses[-1][1]:.4f}")
        line = ", ".join(parts)
        if self.state == "done" and self.lora_path:
            line += f". LoRA written to {self.lora_path}"
        elif self.state == "stopped" and self.lora_path:
            line += f". Stopped; LoRA so far in {self.lora_path} (Resume continues)"
        elif self.state == "error":
            line += f". Error: {self.error}"
        return line


def format_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


class TrainJob:
    """One training run in a background thread. Create through ``JobRegistry.start``."""

    def __init__(self, config: TrainConfig, trainer: Trainer, pipeline: Any = None) -> None:
        self.job_id = uuid.uuid4().hex[:12]
        self.config = config
        self.stop_flag = StopFlag()
        self._trainer = trainer
        self._pipeline = pipeline
        self._lock = threading.Lock()
        self._state = "starting"
        self._step = 0
        self._total = config.steps
        self._first: tuple[float, int] | None = None   # (time, step) of the first "train" event: rate baseline
        self._last: tuple[float, int] | None = None
        self._losses: dict[int, float] = {}
        self._samples: list[Path] = []
        self._log: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self._lora: Path | None = None
        self._error: str | None = None
        self.started_at = time.time()
        self._t0 = time.monotonic()
        self._t_end: float | None = None
        self.thread = threading.Thread(target=self._run, name=f"train-{self.job_id}", daemon=True)

    # ------------------------------------------------------------------ the thread
    def _log_line(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        with self._lock:
            self._log.append(f"{stamp} {text}")

    def _on_progress(self, ev: ProgressEvent) -> None:
        now = time.monotonic()
        with self._lock:
            if ev.stage == "train":
                if self._state == "starting":
                    self._state = "running"
                if ev.total:
                    self._total = int(ev.total)
                if self._first is None:
                    self._first = (now, ev.current)
                self._step = int(ev.current)
                self._last = (now, ev.current)
                if "loss" in ev.metrics:
                    self._losses[int(ev.current)] = float(ev.metrics["loss"])
        # Per-step lines carry the loss, already plotted: log every 10th step and every other stage's events.
        if ev.stage != "train" or "loss" not in ev.metrics or ev.current % 10 == 0 or ev.current == ev.total:
            total = f"/{ev.total}" if ev.total else ""
            self._log_line(f"[{ev.stage}] {ev.current}{total} {ev.message}".rstrip())

    def _on_sample(self, step: int, path: Path) -> None:
        with self._lock:
            self._samples.append(Path(path))
        self._log_line(f"[sample] step {step}: {path}")

    def _on_save(self, step: int, path: Path) -> None:
        with self._lock:
            self._lora = Path(path)
        self._log_line(f"[save] step {step}: {path}")

    def _run(self) -> None:

        self._log_line(f"training {self.config.resolved_run_name()!r} on {self.config.base!r}: "
                       f"{self.config.steps} steps, rank {self.config.rank}, data {self.config.data_dir}")
        callbacks = TrainCallbacks(on_sample=self._on_sample, on_save=self._on_save)
        try:
            kwargs = {"pipeline": self._pipeline} if self._pipeline is not None else {}
            result = self._trainer(self.config, progress=self._on_progress, stop=self.stop_flag,
                                   callbacks=callbacks, **kwargs)
        except LoraStudioError as err:
            self._finish("error", error=str(err))
            self._log_line(f"[error] {err}")
        except BaseException as err:  # a bug: keep the traceback where a developer finds it, say so on the page
            tb = traceback.format_exc()
            print(f"LoRA Studio training job {self.job_id} failed:\n{tb}", file=sys.stderr)
            for line in tb.rstrip().splitlines():
                self._log_line(line)
            self._finish("error", error=f"internal error {type(err).__name__}: {err}. This is a bug in LoRA "
                                        "Studio; the traceback is in the log below.")
        else:
            with self._lock:
                self._lora = Path(result.lora_path)
                self._step = int(result.steps_done)
                # the result holds every step's loss, also those before a resume
                self._losses.update({i + 1: float(x) for i, x in enumerate(result.losses)})
                self._samples = [Path(p) for p in result.samples] or self._samples
            self._finish("stopped" if result.stopped else "done")
            self._log_line(f"[{'stopped' if result.stopped else 'done'}] LoRA: {result.lora_path}")
        finally:
            self._pipeline = None  # the base model is not needed any more; let it be freed

    def _finish(self, state: str, error: str | None = None) -> None:
        with self._lock:
            self._state = state
            self._error = error
            self._t_end = time.monotonic()

    # ------------------------------------------------------------------ for pollers
    def stop(self) -> None:
        """Ask the job to stop after the current step (it saves the LoRA and a resumable state)."""
        self.stop_flag.request()
        with self._lock:
            if self._state in ("starting", "running"):
                self._state = "stopping"
        self._log_line("[stop] requested; stopping after the current step")

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            now = self._t_end if self._t_end is not None else time.monotonic()
            rate = eta = None
            if self._first is not None and self._last is not None and self._last[1] > self._first[1]:
                rate = (self._last[1] - self._first[1]) / max(self._last[0] - self._first[0], 1e-9)
                eta = max(0, self._total - self._step) / rate if rate > 0 else None
            return JobSnapshot(self.job_id, self._state, self._step, self._total, self.started_at, now - self._t0,
                               rate, eta, sorted(self._losses.items()), list(self._samples), list(self._log), self._lora,
                               self.config.run_dir(), self._error, self.config.to_dict())

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def wait(self, timeout: float | None = None) -> JobSnapshot:
        self.thread.join(timeout)
        return self.snapshot()


class JobRegistry:
    """Every training job of this process by id. One job trains at a time (training fills the machine)."""

    def __init__(self, trainer: Trainer | None = None) -> None:
        self._trainer = trainer
        self._jobs: dict[str, TrainJob] = {}
        self._order: list[str] = []
        self._lock = threading.Lock()

    def _default_trainer(self) -> Trainer:
        if self._trainer is None:

            return train
        return self._trainer

    def start(self, config: TrainConfig, pipeline: Any = None) -> str:
        """Check ``config`` and start training it in the background; returns the job id.

        Raises ``ConfigError`` for a bad config and ``TrainingError`` while another job is training."""
        config.validate()
        if not config.data_dir:
            raise ConfigError("no training images: give the folder of training images first.")
        with self._lock:
            busy = [j for j in self._jobs.values() if j.running]
            if busy:
                raise TrainingError(f"training job {busy[0].job_id} ({busy[0].config.resolved_run_name()!r}) is "
                                    "still running; stop it or wait for it to finish before starting another.")
            job = TrainJob(config, self._default_trainer(), pipeline)
            self._jobs[job.job_id] = job
            self._order.append(job.job_id)
            job.thread.start()
        return job.job_id

    def get(self, job_id: str) -> TrainJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise ConfigError(f"no training job with id {job_id!r} in this app session (jobs are forgotten when "
                              "the app restarts); start a new run or use Resume.")
        return job

    def snapshot(self, job_id: str) -> JobSnapshot:
        return self.get(job_id).snapshot()

    def stop(self, job_id: str) -> JobSnapshot:
        job = self.get(job_id)
        job.stop()
        return job.snapshot()

    def current(self) -> str | None:
        """The id of the job a (re)loaded page should show: the running one, else the most recent, else None."""
        with self._lock:
            for job_id in reversed(self._order):
                if self._jobs[job_id].running:
                    return job_id
            return self._order[-1] if self._order else None

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._order)


REGISTRY = JobRegistry()  # the GUI's shared job table (keyed by job id; every other value is per session)
