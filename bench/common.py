"""Small helpers the benchmark scripts share: timing, medians, peak memory, worker subprocesses, tables.

Peak memory on the CPU is the process's resident high-water mark (``VmHWM`` in ``/proc/self/status``, or
``ru_maxrss`` where there is no /proc), so each measured variant runs in its own worker process: a peak
that belongs to one variant never hides in another's number. On a GPU it is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

# OpenMP's wait policy is left at its default, which is what the app runs with. (An earlier version set
# OMP_WAIT_POLICY=PASSIVE to be kind to a shared machine; that made every small parallel op pay a thread
# wake-up and LoraMixer.apply, 176 small matmuls, about 2x slower, while diffusers' Python-bound loader
# hardly changed. On a shared machine export OMP_WAIT_POLICY=PASSIVE yourself and say so with the numbers.)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from lora_studio.cpu_memory import tune_glibc_malloc  # noqa: E402

tune_glibc_malloc()  # the CLI's allocator settings (cpu_memory.py) hold in every worker, baselines included
RESULT_TAG = "BENCH_RESULT "


# --------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """The highest resident set size of this process so far."""
    kb = _status_kb("VmHWM")
    if kb is None:  # no /proc: ru_maxrss is KiB on Linux, bytes on macOS
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb if sys.platform == "darwin" else kb * 1024
    return kb * 1024


def current_rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    return (kb or 0) * 1024


def reset_peak_rss() -> bool:
    """Start a new high-water mark (Linux: writing 5 to /proc/self/clear_refs). False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f}"


# --------------------------------------------------------------------------- timing
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], repeat: int = 1, warmup: int = 0, device="cpu") -> list[float]:
    """Seconds per call for ``repeat`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def measured_matmul_tflops(device: str = "cuda", n: int = 8192, iters: int = 20) -> float | None:
    """Dense bf16 matmul rate actually reached on this GPU (the MFU denominator); None on the CPU."""
    import torch

    if not str(device).startswith("cuda"):
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    rate = 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return rate


class StepProfiler:
    """``torch.profiler`` over ``steps`` training steps that follow the first ``start`` (call ``after_step``
    with the number of steps done after each one), then ``summary()``: per step, the wall time, the time
    the GPU spent in kernels and copies, how many it ran, and how many aten calls the CPU made (nested calls
    included, so ``aten::linear`` and the ``aten::addmm`` it makes count twice). A step
    whose wall time is far above its GPU time is bound by the CPU (Python, dispatch, launches), not the GPU.
    The profiled steps come after the timed ones, so profiling never touches steps/s."""

    def __init__(self, device: str, start: int, steps: int):
        self.device, self.start, self.steps = device, start, steps
        self._prof, self._t0, self.wall = None, 0.0, 0.0

    def after_step(self, done: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        if self.steps <= 0 or done not in (self.start, self.start + self.steps):
            return
        sync(self.device)  # the window holds exactly the profiled steps' GPU work
        if done == self.start:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
            self._prof = profile(activities=acts)
            self._prof.__enter__()
            self._t0 = time.perf_counter()
        else:
            self.wall = time.perf_counter() - self._t0
            self._prof.__exit__(None, None, None)

    def summary(self, top: int = 10) -> dict | None:
        if self._prof is None or not self.wall:
            return None
        from torch.autograd import DeviceType

        events = self._prof.key_averages()
        gpu = [e for e in events if e.device_type == DeviceType.CUDA]
        n = self.steps
        busy = sum(e.self_device_time_total for e in gpu) / 1e3 / n
        return {"step_ms": 1e3 * self.wall / n,
                "gpu_busy_ms": busy if gpu else None,
                "gpu_ops": sum(e.count for e in gpu) / n if gpu else None,
                "aten_ops": sum(e.count for e in events if e.device_type == DeviceType.CPU
                                and e.key.startswith("aten::")) / n,
                "top_gpu": [(e.key[:70], e.self_device_time_total / 1e3 / n)
                            for e in sorted(gpu, key=lambda e: -e.self_device_time_total)[:top]]}


class SavedActivations:
    """The bytes of the tensors autograd keeps for the backward pass during one training step, each storage
    once and the model's weights excluded: a step's activation memory. It depends on the device only through
    autocast's per-device op lists: CUDA runs group/layer norms (and nearest upsampling) in fp32 and the CPU
    does not, so a CPU run under ``emulate_cuda_autocast`` counts what a GPU step keeps. The step measured is
    the one after the first ``at`` (call ``after_step`` with the number of steps done after each one)."""

    def __init__(self, at: int, weights: Callable[[], Sequence]):
        self.at, self._weights = at, weights
        self._hooks, self._skip, self._kept = None, set(), {}
        self.bytes: int | None = None
        self.by_dtype: dict[str, int] = {}

    def _pack(self, t):
        st = t.untyped_storage()
        if st.data_ptr() not in self._skip:
            self._kept[st.data_ptr()] = (st.nbytes(), str(t.dtype).removeprefix("torch."))
        return t

    def after_step(self, done: int) -> None:
        import torch

        if done == self.at:
            self._skip = {p.untyped_storage().data_ptr() for p in self._weights()}
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._hooks.__enter__()
        elif done == self.at + 1 and self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            for n, dtype in self._kept.values():
                self.by_dtype[dtype] = self.by_dtype.get(dtype, 0) + n
            self.bytes = sum(self.by_dtype.values())


# The ops of a UNet training step that CUDA's autocast runs in fp32 and the CPU's leaves in the input's dtype
# (torch 2.13: of the ops a demo-UNet step calls, those whose torch._C._dispatch_dump lists AutocastCUDA and not
# AutocastCPU are these, exp and sum, which meet only fp32 inputs there, and convolution, which the CPU casts
# one level up at conv2d)
CUDA_FP32_OPS = ("group_norm", "layer_norm", "upsample_nearest2d", "upsample_nearest2d.vec")


@contextmanager
def emulate_cuda_autocast(enabled: bool = True) -> Iterator[None]:
    """While inside, CPU autocast casts to fp32 where CUDA autocast does (``CUDA_FP32_OPS``), so a CPU run keeps
    for the backward what a GPU run keeps, and code that must match autocast bit for bit is tested against
    CUDA's rules. Registers AutocastCPU kernels on the aten library; they go again on leaving. With
    ``enabled=False`` it does nothing (the CPU's own rules)."""
    if not enabled:
        yield
        return
    import torch

    skip = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def fp32(a):
        return a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64 else a

    def kernel(op):
        def run(*args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(skip):
                return op(*map(fp32, args), **{k: fp32(v) for k, v in kwargs.items()})
        return run

    lib = torch.library.Library("aten", "IMPL")
    try:
        for name in CUDA_FP32_OPS:
            base, _, overload = name.partition(".")
            lib.impl(name, kernel(getattr(getattr(torch.ops.aten, base), overload or "default")), "AutocastCPU")
        yield
    finally:
        lib._destroy()


# --------------------------------------------------------------------------- workers
def emit(result: dict) -> None:
    """A worker's last word: one tagged JSON line on stdout."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_worker(script: str | Path, args: Sequence[str], timeout: float | None = None) -> dict:
    """Run ``python script args`` in a fresh process and return the dict it ``emit``-ed.

    stderr passes through (so warnings and tracebacks are visible); a failed worker raises with its output."""
    cmd = [sys.executable, str(script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, timeout=timeout)
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"worker failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}")
    return json.loads(found[-1][len(RESULT_TAG):])


def quiet_libraries() -> None:
    """No progress bars or info chatter from diffusers/transformers in worker output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# --------------------------------------------------------------------------- reporting
def machine_summary() -> str:
    import torch

    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    try:
        load = " ".join(open("/proc/loadavg", encoding="ascii").read().split()[:3])
    except OSError:
        load = "n/a"
    return (f"machine: {os.cpu_count()} CPUs ({cpu}), {gpu}; torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}; load {load}")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))


def ratio_line(ratios: dict[str, float | None]) -> str:
    parts = [f"{k}={'n/a' if v is None else f'{v:.2f}x'}" for k, v in ratios.items()]
    return "RATIO ours/baseline: " + " ".join(parts)


def safe_ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b
