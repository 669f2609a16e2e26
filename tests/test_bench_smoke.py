"""Keep the benchmark scripts alive: each runs at ``--size tiny --repeat 1`` and prints its table and ratio line.

Speed is never asserted here (CI machines are shared); bench/RESULTS.md holds measured numbers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _run(cmd: list[str]) -> list[str]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [ln for ln in proc.stdout.splitlines() if ln.strip()]


def _check_output(lines: list[str], header: str, ratio_keys: tuple[str, ...]) -> None:
    assert any(ln.startswith("| " + header) for ln in lines), "\n".join(lines)
    assert any(set(ln) <= set("|-") and ln.startswith("|--") for ln in lines), "no table rule line"
    last = lines[-1]
    assert last.startswith("RATIO ours/baseline: "), last
    values = dict(part.split("=") for part in last.split(": ", 1)[1].split())
    assert set(ratio_keys) <= set(values), last
    for key in ratio_keys:
        assert values[key].endswith("x") and float(values[key][:-1]) > 0, last


@pytest.mark.slow
def test_train_step_tiny_prints_table_and_ratios():
    lines = _run([sys.executable, "bench/train_step.py", "--size", "tiny", "--repeat", "1"])
    _check_output(lines, "variant", ("steps_per_s@b1", "peak_mem@b1", "saved_acts@b1", "steps_per_s@b4", "peak_mem@b4",
                                     "saved_acts@b4"))
    assert any(ln.startswith("| ours ") for ln in lines) and any(ln.startswith("| baseline ") for ln in lines)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_mix_apply_tiny_through_the_cli(dtype):
    lines = _run([sys.executable, "-m", "lora_studio", "bench", "mix_apply", "--size", "tiny", "--repeat", "1",
                  "--dtype", dtype])
    assert any(f"demo model in {dtype}" in ln for ln in lines), "\n".join(lines)
    _check_output(lines, "apply", ("load_apply", "strength_change", "render_step_vs_unfused"))
    assert any(ln.startswith("same weights:") for ln in lines)
    ours = next(ln for ln in lines if ln.startswith("| ours: LoraMixer"))
    assert ours.rstrip(" |").endswith("0 opens, 0 reads"), ours  # a strength change reads no file


def test_mix_apply_many_loras_tiny():
    lines = _run([sys.executable, "bench/mix_apply.py", "--size", "tiny", "--repeat", "1", "--loras", "1,3",
                  "--rank-range", "1,4"])
    _check_output(lines, "LoRAs", ("change_flat_ours", "load@1", "change@1", "load@3", "change@3"))
    assert any(ln.startswith("| 3 ") for ln in lines), "\n".join(lines)
    assert any(ln.startswith("same weights:") for ln in lines)


@pytest.mark.slow
def test_export_tiny_prints_table_and_ratios():
    lines = _run([sys.executable, "bench/export.py", "--size", "tiny", "--repeat", "1"])
    _check_output(lines, "export", ("seconds", "peak_rss", "peak_rss_vs_ckpt"))
    assert any(ln.startswith("outputs agree") for ln in lines)


def test_bench_cli_rejects_unknown_names():
    proc = subprocess.run([sys.executable, "-m", "lora_studio", "bench", "nope"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert "'nope'" in proc.stderr and "train_step" in proc.stderr


def test_open_watcher_counts_opens_and_reads(tmp_path):
    from bench.mix_apply import OpenWatcher

    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    w = OpenWatcher(f)
    if not w.works:
        pytest.skip("inotify is not available on this system")
    assert w.count() == (0, 0)
    f.read_bytes()
    opens, reads = w.count()
    assert opens >= 1 and reads >= 1
    assert w.count() == (0, 0)


def test_peak_rss_and_ratio_line():
    from bench.common import peak_rss_bytes, ratio_line

    before = peak_rss_bytes()
    block = bytearray(64 * 2**20)  # touch 64 MiB
    block[::4096] = b"x" * len(block[::4096])
    assert peak_rss_bytes() >= before
    assert peak_rss_bytes() >= 64 * 2**20
    assert ratio_line({"a": 1.4249, "b": None}) == "RATIO ours/baseline: a=1.42x b=n/a"


@pytest.mark.slow
def test_train_step_profile_shows_where_a_step_goes():
    lines = _run([sys.executable, "bench/train_step.py", "--size", "tiny", "--repeat", "1", "--batches", "1",
                  "--warmup", "1", "--steps", "2", "--profile", "2"])
    _check_output(lines, "variant", ("steps_per_s@b1", "peak_mem@b1"))
    start = next(i for i, ln in enumerate(lines) if ln.startswith("where a step goes"))
    rows = [ln.split("|") for ln in lines[start:] if ln.startswith(("| ours ", "| baseline "))]
    assert len(rows) == 2, "\n".join(lines[start:])
    for row in rows:  # step ms and aten calls per step are measured numbers on the CPU too; GPU columns say n/a
        assert float(row[3]) > 0 and int(row[7].replace(",", "")) > 100 and row[4].strip() == "n/a", row


def test_saved_activations_counts_each_kept_storage_once_without_the_weights():
    import torch

    from bench.common import SavedActivations

    weight = torch.randn(1000)                      # a model weight: kept by the mul, but not an activation

    def step(counter, done):
        x = torch.randn(1000, requires_grad=True)
        h = x * 2.0                                 # keeps nothing (a constant factor)
        # h * weight keeps the weight only (the weight needs no gradient, so h is not kept); each exp keeps its
        # output and the product keeps the same two tensors again: two storages, each counted once
        y = (h * weight).sum() + (h.exp() * h.exp()).sum()
        y.backward()
        counter.after_step(done)

    acts = SavedActivations(at=1, weights=lambda: [weight])
    step(acts, 1)                                   # not measured: the hooks start after step 1
    assert acts.bytes is None
    step(acts, 2)                                   # measured
    assert acts.bytes == 2 * 1000 * 4                # the two exp outputs; not the weight
    step(acts, 3)                                   # after the measured step nothing changes
    assert acts.bytes == 2 * 1000 * 4
    assert acts.by_dtype == {"float32": 2 * 1000 * 4}


def test_emulated_cuda_autocast_runs_the_norms_in_fp32_inside_only():
    import torch
    import torch.nn.functional as F

    from bench.common import emulate_cuda_autocast

    x = torch.randn(1, 4, 3, 3, dtype=torch.bfloat16)

    def dtypes():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (F.group_norm(x, 2).dtype, F.layer_norm(x, (3,)).dtype,
                    F.interpolate(x, scale_factor=2.0, mode="nearest").dtype, F.silu(x).dtype)

    assert dtypes() == (torch.bfloat16,) * 4        # the CPU's own rules
    with emulate_cuda_autocast():
        assert dtypes() == (torch.float32,) * 3 + (torch.bfloat16,)  # CUDA's (SiLU has no autocast rule)
        ref = F.group_norm(x.float(), 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(F.group_norm(x, 2), ref)
    assert dtypes() == (torch.bfloat16,) * 4        # gone again


def test_cuda_check_runs_its_checks_on_the_cpu_in_a_dry_run():
    """The GPU checks only mean something on a GPU, but their code must not rot where there is none: a dry run
    takes every check through the CPU."""
    lines = _run([sys.executable, "bench/cuda_check.py", "--dry-run"])
    passed = [ln for ln in lines if ln.startswith("PASS ")]
    assert lines[-1] == f"{len(passed)} of {len(passed)} checks passed" and len(passed) >= 6, "\n".join(lines)
    assert any(ln.startswith("PASS lean_backward") and "max difference 0.0e+00" in ln for ln in passed)
