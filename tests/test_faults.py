"""Faults while working: stops at random steps, SIGINT/SIGTERM to the CLI, a full disk or an unwritable folder
during a LoRA save, a state save and an export, out of memory in a step. Nothing is lost: the resumed LoRA
equals an uninterrupted run, no half-written file carries a final name, earlier files stay byte for byte."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bad_inputs as B
import lora_studio.fileio.tensors as fileio
import lora_studio.train.trainer as trainer_mod
from train_configs import tiny_config
from lora_studio.demo import make_demo_dataset, random_demo_pipeline
from lora_studio.errors import ExportError, LoraStudioError, TrainingError
from lora_studio.progress import StopFlag
from lora_studio.train.config import TrainConfig
from lora_studio.train.trainer import TrainCallbacks, train
from train_threads import one_torch_thread  # noqa: F401  (autouse: the CLI subprocess below runs one thread too)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("fault-data"), count=4, repeats=2)


def _cfg(data, out, **kw) -> TrainConfig:
    return tiny_config(data, out, **{"alpha": 4.0, "steps": 6, "seed": 5, "lr_scheduler": "cosine",
                                     "lr_warmup_steps": 1, **kw})


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return fileio.load_safetensors(path)[0]


def _assert_same_lora(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], rtol=1e-6, atol=1e-8), k


def _assert_clean(run_dir: Path) -> None:
    """No temporary file or folder left, and every .safetensors file under the run loads."""
    leftovers = [p for p in run_dir.rglob("*") if p.name.endswith(".part") or ".part" in p.name]
    assert leftovers == []
    files = list(run_dir.rglob("*.safetensors"))
    assert files
    for f in files:
        fileio.load_safetensors(f)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run every interrupted one must equal."""
    out = tmp_path_factory.mktemp("reference")
    return train(_cfg(data, out, run_name="full"), pipeline=random_demo_pipeline())


# --------------------------------------------------------------------------- stops and resumes
def test_stops_at_random_steps_then_resume_equals_uninterrupted(data, tmp_path, reference):
    stops = sorted(random.Random(8).sample(range(1, 6), 3))  # seeded: the same 3 steps in every run
    cfg = _cfg(data, tmp_path, run_name="parts")
    pipe = random_demo_pipeline()
    done = 0
    for i, at in enumerate(stops):
        stop = StopFlag()
        cb = TrainCallbacks(on_step=lambda step, loss, at=at: stop.request() if step == at else None)
        part = train(cfg.replace(resume=i > 0), stop=stop, callbacks=cb, pipeline=pipe)
        assert part.stopped and part.steps_done == at > done
        done = at
        _assert_clean(part.run_dir)
    last = train(cfg.replace(resume=True), pipeline=pipe)
    assert last.steps_done == 6 and not last.stopped
    assert last.losses == pytest.approx(reference.losses, rel=1e-6)
    _assert_same_lora(reference.lora_path, last.lora_path)
    _assert_clean(last.run_dir)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() - t0 < timeout, f"{path} did not appear in {timeout}s"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_cli_saves_state_and_resume_completes_it(signum, data, tmp_path, reference):
    """``python -m lora_studio train`` gets the signal once its first state save exists: it stops after that
    step, exits 128+signal, leaves a whole LoRA and state; resuming (in-process) ends equal to the reference."""
    cfg = _cfg(data, tmp_path, run_name="sig", steps=40, save_state_every_n_steps=1)
    cfg_file = tmp_path / "cfg.json"
    cfg.to_json(cfg_file)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lora_studio", "train", "--config", str(cfg_file),
                             "--base", "demo"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(tmp_path / "sig" / "state" / "latest.json", proc, timeout=240)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "stopping after this step" in err and "--resume" in out
    info = json.loads((tmp_path / "sig" / "state" / "latest.json").read_text())
    assert 1 <= info["step"] < 40
    _assert_clean(tmp_path / "sig")
    # the stopped LoRA is the one of its step; the reference run (6 steps) shares the first steps only if
    # the schedule matched, so compare the resumed end of a 40-step run with an uninterrupted 40-step run
    from lora_studio.demo import load_demo_pipeline

    resumed = train(cfg.replace(resume=True), pipeline=load_demo_pipeline())
    full = train(cfg.replace(run_name="sig-full", save_state_every_n_steps=0), pipeline=load_demo_pipeline())
    assert resumed.steps_done == full.steps_done == 40
    _assert_same_lora(full.lora_path, resumed.lora_path)
    _assert_clean(tmp_path / "sig")


# --------------------------------------------------------------------------- full disk, unwritable folders
def _half_then_enospc(real):
    """A writer that writes half of what the real one would, then fails as a full disk does."""
    def write(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
    return write


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """A real write failure: the kernel refuses to grow any file past ``nbytes`` (EFBIG), as a full disk would."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def test_full_disk_during_the_final_lora_save_keeps_the_previous_file(data, tmp_path, monkeypatch):
    cfg = _cfg(data, tmp_path, steps=2)
    first = train(cfg, pipeline=random_demo_pipeline())
    before = first.lora_path.read_bytes()
    monkeypatch.setattr(fileio, "save_file", _half_then_enospc(fileio.save_file))
    with pytest.raises(ExportError) as info:
        train(cfg.replace(learning_rate=5e-2), pipeline=random_demo_pipeline())
    B.assert_helpful(info.value, (("No space left on device",), ("free some disk space",)), first.lora_path)
    assert first.lora_path.read_bytes() == before
    monkeypatch.undo()
    _assert_clean(first.run_dir)


def test_real_write_failures_become_export_errors(tmp_path):
    """safetensors raises SafetensorError and torch.save a RuntimeError when the disk refuses a write; both
    reach the user as ExportError, and the file that was there stays as it was."""
    target = tmp_path / "lora.safetensors"
    fileio.save_safetensors_atomic({"a": torch.ones(4)}, target)
    before = target.read_bytes()
    big = {"a": torch.zeros(100_000)}
    with file_size_limit(4096):
        with pytest.raises(ExportError) as info:
            fileio.save_safetensors_atomic(big, target)
        with pytest.raises(ExportError) as info2:
            with fileio.atomic_path(tmp_path / "trainer.pt") as p:
                torch.save(big, p)
    assert "File too large" in str(info.value) and "nothing was overwritten" in str(info.value)
    assert "trainer.pt" in str(info2.value)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_full_disk_during_a_state_save_keeps_the_previous_state(data, tmp_path, monkeypatch):
    cfg = _cfg(data, tmp_path, steps=4, save_state_every_n_steps=2)
    stop = StopFlag()
    cb = TrainCallbacks(on_step=lambda step, loss: stop.request() if step == 2 else None)
    train(cfg, stop=stop, callbacks=cb, pipeline=random_demo_pipeline())
    state = tmp_path / "run" / "state"
    saved = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    real_save = torch.save

    def failing_save(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        Path(f).write_bytes(Path(f).read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(LoraStudioError) as info:  # the state save at step 4 fails... after the final LoRA
        train(cfg.replace(resume=True, steps=6), pipeline=random_demo_pipeline())
    monkeypatch.undo()
    B.assert_helpful(info.value, (("No space left on device",),))
    assert {p: p.read_bytes() for p in state.rglob("*") if p.is_file()} == saved
    # and the run resumes from the state that was kept
    done = train(cfg.replace(resume=True), pipeline=random_demo_pipeline())
    assert done.steps_done == 4
    _assert_clean(tmp_path / "run")


def test_output_folder_that_is_a_file(data, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a regular file where a folder is expected\n")
    with pytest.raises(LoraStudioError) as info:
        train(_cfg(data, blocker, steps=1), pipeline=random_demo_pipeline())
    B.assert_helpful(info.value, (("not-a-folder",),))
    with pytest.raises(ExportError) as info:
        fileio.save_safetensors_atomic({"a": torch.ones(2)}, blocker / "x.safetensors")
    B.assert_helpful(info.value, (("cannot write into",),))
    assert blocker.read_text() == "a regular file where a folder is expected\n"


def test_a_run_that_fails_before_step_1_leaves_no_run_folder(data, tmp_path, monkeypatch):
    """A run that fails after its folder was made but before it trained (a rank too large for a layer, a
    failure while caching latents) removes the folder it made, which held only config.json. A folder that was
    there before keeps what it held."""
    with pytest.raises(LoraStudioError):
        train(_cfg(data, tmp_path, rank=48, steps=1), pipeline=random_demo_pipeline())
    assert not (tmp_path / "run").exists()

    def failing_cache(*args, **kwargs):
        raise TrainingError("cannot encode the pictures; free some memory and start again.")

    monkeypatch.setattr(trainer_mod, "LatentCache", failing_cache)
    with pytest.raises(TrainingError, match="cannot encode"):
        train(_cfg(data, tmp_path, steps=1), pipeline=random_demo_pipeline())
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine\n")
    with pytest.raises(TrainingError, match="cannot encode"):
        train(_cfg(data, tmp_path, steps=1), pipeline=random_demo_pipeline())
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine\n"


def test_state_folder_that_is_a_file(data, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "state").write_text("in the way\n")
    stop = StopFlag()
    cb = TrainCallbacks(on_step=lambda step, loss: stop.request())
    with pytest.raises(LoraStudioError) as info:
        train(_cfg(data, tmp_path, steps=3), stop=stop, callbacks=cb, pipeline=random_demo_pipeline())
    B.assert_helpful(info.value, (("state",),))


# --------------------------------------------------------------------------- exports
@pytest.fixture(scope="module")
def export_inputs(tmp_path_factory):
    from lora_factories import write_kohya_lora

    folder = tmp_path_factory.mktemp("export")
    pipe = random_demo_pipeline()
    return pipe, write_kohya_lora(folder / "style.safetensors", pipe)


def test_full_disk_during_a_checkpoint_export_keeps_the_previous_file(tmp_path, export_inputs, monkeypatch):
    from lora_studio.export import export_merged_checkpoint

    pipe, lora = export_inputs
    out = tmp_path / "merged.safetensors"
    export_merged_checkpoint(pipe, [(lora, 0.5)], out, dtype="fp32")
    before = out.read_bytes()
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    monkeypatch.setattr(fileio, "save_file", _half_then_enospc(fileio.save_file))
    with pytest.raises(ExportError) as info:
        export_merged_checkpoint(pipe, [(lora, 1.0)], out, dtype="fp32")
    B.assert_helpful(info.value, (("No space left on device",),), out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors"]
    assert all(torch.equal(weights[k], v) for k, v in pipe.unet.state_dict().items())  # caller's pipe restored
    with pytest.raises(ExportError):
        export_merged_checkpoint(pipe, [(lora, 1.0)], tmp_path / "merged.safetensors" / "x.safetensors")


@pytest.mark.slow
def test_full_disk_during_a_diffusers_folder_export_keeps_the_previous_folder(tmp_path, export_inputs,
                                                                              demo_model_dir):
    """A real write failure (file size limit) inside diffusers' save_pretrained."""
    from lora_studio.export import export_merged_checkpoint

    _, lora = export_inputs
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("earlier export\n")
    with file_size_limit(64 * 1024):
        with pytest.raises(ExportError) as info:
            export_merged_checkpoint(str(demo_model_dir), [(lora, 1.0)], out, fmt="diffusers", dtype="fp32")
    B.assert_helpful(info.value, (("File too large",),))
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


# --------------------------------------------------------------------------- out of memory
def test_out_of_memory_in_a_step_is_advice_and_leaves_the_pipeline_clean(data, tmp_path, monkeypatch):
    calls = []
    real = trainer_mod.diffusion_loss

    def oom_on_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **kw)

    monkeypatch.setattr(trainer_mod, "diffusion_loss", oom_on_second)
    pipe = random_demo_pipeline()
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(TrainingError) as info:
        train(_cfg(data, tmp_path, steps=3), pipeline=pipe)
    B.assert_helpful(info.value, (("out of gpu memory",), ("batch_size",), ("resolution",),
                                  ("gradient_checkpointing",)))
    assert pipe.unet.state_dict().keys() == weights.keys()  # the LoRA layers are gone again
    assert all(torch.equal(weights[k], v) for k, v in pipe.unet.state_dict().items())


# --------------------------------------------------------------------------- security: where the GUI listens
def test_gui_binds_localhost_unless_told_and_refuses_the_network_without_auth(monkeypatch, tmp_path, capsys):
    import lora_studio.ui.app as ui_app
    from lora_studio.ui.launch import exposure_refusal, launch_from_args, parse_args

    launched = []

    class FakeApp:
        def queue(self):
            return self

        def launch(self, **kw):
            launched.append(kw)

    monkeypatch.setattr(ui_app, "build_app", lambda ctx: FakeApp())
    out = str(tmp_path / "outputs")
    assert launch_from_args(["--outputs", out, "--no-browser", "--port", "7999"]) == 0
    assert launched[-1]["server_name"] == "127.0.0.1" and launched[-1]["share"] is False
    assert launched[-1]["auth"] is None
    assert capsys.readouterr().err == ""
    for flag in ("--listen", "--share"):                           # no password: refused, nothing served
        assert launch_from_args(["--outputs", out, "--no-browser", "--port", "7999", flag]) == 2
        assert len(launched) == 1 and "--auth user:pass" in capsys.readouterr().err
    assert launch_from_args(["--outputs", out, "--no-browser", "--port", "7999", "--listen", "--auth", "u:p"]) == 0
    assert launched[-1]["server_name"] == "0.0.0.0" and launched[-1]["auth"] == ("u", "p")
    assert launch_from_args(["--outputs", out, "--no-browser", "--port", "7999", "--share", "--auth", "u:p"]) == 0
    assert launched[-1]["auth"] == ("u", "p") and launched[-1]["share"] is True
    assert capsys.readouterr().err == ""
    assert exposure_refusal(parse_args(["--share"])) is not None
    # the served folders are only outputs/ and what was named at launch
    roots = [Path(p) for p in launched[-1]["allowed_paths"]]
    assert Path(out).resolve() in roots and Path("/") not in roots and Path.home() not in roots


def test_demo_sample_grid_is_written_atomically(tmp_path, monkeypatch):
    from PIL import Image

    from lora_studio.demo.render import sample_grid

    out = tmp_path / "samples.png"
    out.write_bytes(b"earlier grid")
    real_save = Image.Image.save

    def half_then_enospc(self, fp, *a, **kw):
        real_save(self, fp, *a, **kw)
        Path(fp).write_bytes(Path(fp).read_bytes()[:50])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", half_then_enospc)
    with pytest.raises(ExportError):
        sample_grid(random_demo_pipeline(), out, steps=1, seeds=(0,))
    assert out.read_bytes() == b"earlier grid" and [p.name for p in tmp_path.iterdir()] == ["samples.png"]


def test_damaged_training_state_is_a_clear_error(data, tmp_path):
    """A state damaged after a crash or by hand: resuming says which file is damaged; nothing else is raised."""
    cfg = _cfg(data, tmp_path, steps=3)
    stop = StopFlag()
    train(cfg, stop=stop, callbacks=TrainCallbacks(on_step=lambda s, l: stop.request()), pipeline=random_demo_pipeline())
    state = tmp_path / "run" / "state"
    good = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    step = next(state.glob("step-*"))
    cases = {
        "latest.json": (state / "latest.json", b"{not json"),
        "latest.json ": (state / "latest.json", b'{"step": 1}'),
        "step-999999": (state / "latest.json", b'{"dir": "step-999999"}'),
        "trainer.json": (step / "trainer.json", b"\xff\xfe garbage"),
        "trainer.json ": (step / "trainer.json", b'{"config": {}}'),
        "trainer.pt": (step / "trainer.pt", good[step / "trainer.pt"][:100]),
        "adapter.safetensors": (step / "adapter.safetensors", good[step / "adapter.safetensors"][:100]),
        "adapter.safetensors ": (step / "adapter.safetensors", None),
    }
    pipe = random_demo_pipeline()
    for named, (path, content) in cases.items():
        for p, b in good.items():
            p.write_bytes(b)
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content)
        with pytest.raises(LoraStudioError) as info:
            train(cfg.replace(resume=True), pipeline=pipe)
        assert named.strip() in str(info.value) or step.name in str(info.value), str(info.value)
        B.assert_helpful(info.value)
