"""``python -m lora_studio train``: settings from preset + flags + --set; Ctrl-C saves and --resume continues."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_studio.cli.main import build_parser
from lora_studio.cli.train import build_config
from lora_studio.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _args(*argv):
    return build_parser().parse_args(["train", *argv])


def test_preset_flags_and_set_build_one_config():
    cfg = build_config(_args("--preset", "demo-cpu", "--data", "d", "--steps", "7", "--lr", "0.01", "--trigger", "sks",
                             "--sample-prompt", "a red circle", "--train-text-encoder", "--resume",
                             "--set", "min_snr_gamma=5", "--set", 'target_modules=["to_q","to_v"]',
                             "--set", "lr_scheduler=cosine"))
    assert (cfg.data_dir, cfg.steps, cfg.learning_rate, cfg.trigger_word) == ("d", 7, 0.01, "sks")
    assert cfg.resolution == 64 and cfg.rank == 8                       # from the preset
    assert cfg.sample_prompts == ["a red circle"] and cfg.train_text_encoder and cfg.resume is True
    assert cfg.min_snr_gamma == 5.0 and cfg.target_modules == ["to_q", "to_v"] and cfg.lr_scheduler == "cosine"
    assert build_config(_args("--resume", "runs/x/state")).resume == "runs/x/state"
    with pytest.raises(ConfigError, match="'stepz'"):
        build_config(_args("--set", "stepz=3"))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        build_config(_args("--set", "steps"))
    with pytest.raises(ConfigError, match="steps = 0"):
        build_config(_args("--steps", "0"))


def test_print_config_and_missing_data(capsys):
    from lora_studio.cli.main import main

    assert main(["train", "--preset", "demo-cpu", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["resolution"] == 64
    assert main(["train", "--preset", "demo-cpu"]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["train", "--preset", "demo-cpu", "--data", "d", "--threads", "0"]) == 2
    assert "--threads 0" in capsys.readouterr().err


def _read_until(proc, pattern: str, timeout: float = 240) -> str:
    """Read the child's stderr (a \\r progress bar, so no line splitting) until ``pattern`` appears."""
    os.set_blocking(proc.stderr.fileno(), False)
    seen, end = "", time.monotonic() + timeout
    while time.monotonic() < end:
        chunk = proc.stderr.read()
        if chunk:
            seen += chunk.decode(errors="replace")
            if re.search(pattern, seen):
                return seen
        elif proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not seen; stderr so far:\n{seen[-2000:]}")


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_finishes(tmp_path):
    from lora_studio.demo import make_demo_dataset, random_demo_pipeline

    base = tmp_path / "base"
    random_demo_pipeline().save_pretrained(base)
    data = make_demo_dataset(tmp_path / "data", count=2, repeats=1)
    common = ["--preset", "demo-cpu", "--data", str(data), "--base", str(base), "--output-dir", str(tmp_path / "out"),
              "--run-name", "r", "--batch-size", "1", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "lora_studio", "train", *common, "--steps", "400"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        _read_until(proc, r"loss \d")                                  # training has started
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    out = out.decode()
    done = int(re.search(r"steps: (\d+)/400", out).group(1))
    assert 1 <= done < 400 and f"r-step{done:06d}.safetensors" in out and "--resume" in out
    assert (tmp_path / "out" / "r" / "state" / f"step-{done:06d}" / "adapter.safetensors").exists()

    res = subprocess.run([sys.executable, "-m", "lora_studio", "train", *common, "--steps", str(done + 1), "--resume"],
                         cwd=tmp_path, capture_output=True, env=env, timeout=240)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert f"steps: {done + 1}/{done + 1}" in res.stdout.decode()
    assert (tmp_path / "out" / "r" / "r.safetensors").exists()
    losses = (tmp_path / "out" / "r" / "loss.csv").read_text().splitlines()
    assert len(losses) == done + 2                                      # header + every step, before and after


def test_network_flags_reach_the_config():
    cfg = build_config(_args("--preset", "demo-cpu", "--network", "lokr", "--factor", "4", "--decompose-both",
                             "--use-tucker", "--conv-rank", "2", "--conv-alpha", "1"))
    assert (cfg.network, cfg.lokr_factor, cfg.decompose_both, cfg.use_tucker, cfg.conv_rank, cfg.conv_alpha) == \
        ("lokr", 4, True, True, 2, 1.0)
    assert build_config(_args("--preset", "demo-cpu", "--use-dora")).use_dora
    with pytest.raises(ConfigError, match="use_dora"):
        build_config(_args("--preset", "demo-cpu", "--network", "loha", "--use-dora"))
