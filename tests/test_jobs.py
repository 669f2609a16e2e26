"""The background training job runner (lora_studio.jobs) on the demo model: progress snapshots, samples,
stop + resume, reattaching by id, and errors that come back as messages."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lora_studio.errors import ConfigError, TrainingError
from lora_studio.jobs import JobRegistry, format_seconds
from lora_studio.progress import report
from lora_studio.train.config import load_preset


@pytest.fixture()
def pipe():
    """The shipped demo model; its random-weight twin (same structure) while the weights are not built yet."""
    from lora_studio.demo import DEMO_MODEL_DIR, load_demo_pipeline, random_demo_pipeline

    return load_demo_pipeline() if (DEMO_MODEL_DIR / "model_index.json").exists() else random_demo_pipeline()


def _config(data: Path, out: Path, **changes):
    base = dict(data_dir=str(data), output_dir=str(out), run_name="job", steps=3, batch_size=2,
                sample_every_n_steps=0, sample_steps=2, sample_prompts=["a red circle"])
    return load_preset("demo-cpu").replace(**{**base, **changes})


def _wait_for(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_job_trains_in_background_and_reports(pipe, demo_dataset, tmp_path):
    reg = JobRegistry()
    job_id = reg.start(_config(demo_dataset, tmp_path, sample_every_n_steps=2), pipeline=pipe)
    assert reg.current() == job_id                      # a reloaded page finds the running job
    snap = reg.get(job_id).wait(120)
    assert snap.state == "done", snap.error
    assert snap.step == snap.total == 3
    assert [s for s, _ in snap.losses] == [1, 2, 3] and all(v > 0 for _, v in snap.losses)
    assert snap.it_per_s is not None and snap.it_per_s > 0
    assert snap.lora_path == tmp_path / "job" / "job.safetensors" and snap.lora_path.is_file()
    assert snap.samples and all(p.is_file() for p in snap.samples)       # sample grid at step 2
    assert "done: step 3/3 (100%)" in snap.status_line() and str(snap.lora_path) in snap.status_line()
    assert any("[save] step 3" in line for line in snap.log)
    # reattach: a new poller with only the id sees the same finished job
    assert reg.current() == job_id and reg.snapshot(job_id).losses == snap.losses


def test_stop_saves_and_resume_continues(pipe, demo_dataset, tmp_path):
    reg = JobRegistry()
    cfg = _config(demo_dataset, tmp_path, steps=400)
    job_id = reg.start(cfg, pipeline=pipe)
    _wait_for(lambda: reg.snapshot(job_id).step >= 2)
    running = reg.snapshot(job_id)
    assert running.state == "running" and running.eta_s is not None and running.eta_s > 0
    with pytest.raises(TrainingError, match="still running"):   # one training at a time
        reg.start(cfg, pipeline=pipe)
    assert reg.stop(job_id).state in ("stopping", "stopped")
    snap = reg.get(job_id).wait(60)
    assert snap.state == "stopped" and 2 <= snap.step < 400
    assert snap.lora_path is not None and snap.lora_path.is_file()
    assert "Resume continues" in snap.status_line()
    # Resume: the same run continues from the saved state (steps counted from there, old losses kept)
    again = reg.start(cfg.replace(resume=True, steps=snap.step + 2), pipeline=pipe)
    resumed = reg.get(again).wait(60)
    assert resumed.state == "done", resumed.error
    assert resumed.step == snap.step + 2
    assert [s for s, _ in resumed.losses] == list(range(1, snap.step + 3))
    assert resumed.losses[: snap.step] == snap.losses[: snap.step]
    assert reg.current() == again and reg.ids() == [job_id, again]


def test_user_errors_become_messages(demo_dataset, tmp_path):
    reg = JobRegistry()
    job_id = reg.start(_config(tmp_path / "missing", tmp_path))
    snap = reg.get(job_id).wait(60)
    assert snap.state == "error"
    assert "does not exist" in snap.error and "missing" in snap.error
    assert "Traceback" not in snap.error and "Traceback" not in "\n".join(snap.log)
    with pytest.raises(ConfigError, match="no training job with id 'nope'"):
        reg.snapshot("nope")
    with pytest.raises(ConfigError, match="training images"):
        reg.start(_config(demo_dataset, tmp_path, data_dir=""))


def test_bugs_are_reported_not_swallowed(demo_dataset, tmp_path, capsys):
    def broken_trainer(config, progress, stop, callbacks):
        report(progress, "train", 1, config.steps, "loss 0.5", loss=0.5)
        raise RuntimeError("boom")

    reg = JobRegistry(trainer=broken_trainer)
    snap = reg.get(reg.start(_config(demo_dataset, tmp_path))).wait(10)
    assert snap.state == "error" and "internal error RuntimeError: boom" in snap.error
    assert snap.step == 1 and snap.losses == [(1, 0.5)]             # what happened before the bug is kept
    assert any("Traceback" in line for line in snap.log)          # the details for a developer
    assert "RuntimeError: boom" in capsys.readouterr().err         # and on the console


def test_format_seconds():
    assert [format_seconds(s) for s in (0.4, 59, 61, 3725)] == ["0 s", "59 s", "1 min 01 s", "1 h 02 min"]
