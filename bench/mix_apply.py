"""Applying a LoRA and moving its strength: LoRA Studio's ``LoraMixer`` vs diffusers' loader, on the same file.

The script writes a kohya LoRA with random weights over every attention projection of the model (UNet
attn1/attn2 to_q/to_k/to_v/to_out.0 and text-encoder q/k/v/out_proj; rank 128 for ``--size sd15``), then
times, on one pipeline and median of ``--repeat`` runs:

* load + apply at strength 1: ``LoraMixer.add`` + ``apply`` vs ``load_lora_weights`` + ``set_adapters`` +
  ``fuse_lora``;
* a strength change to 0.5: ``set_strength`` + ``apply`` vs ``unfuse_lora`` + ``set_adapters`` + ``fuse_lora``.
  File opens are counted with inotify (kernel-level, so reads by the safetensors Rust code count too), and
  the file is moved away during the change, so any read would fail;
* one UNet forward (a render step) on the bare base, with our fused weights, and with diffusers' LoRA
  unfused (peft layers computing the low-rank path) and fused.

Both applied weights are compared (they must agree). The file is read once before timing so neither side
pays for a cold page cache.

``--dtype bf16`` runs both on a bf16 pipeline (weights in bf16, as when rendering in bf16): there LoraMixer
multiplies one LoRA's factors in bf16 (see ``LoraMixer._apply_products``), so the two ways agree to about one
bf16 rounding step of the weights rather than exactly.

    python bench/mix_apply.py --size tiny --repeat 3
    python bench/mix_apply.py --size sd15 --repeat 3
    python bench/mix_apply.py --size sd15 --repeat 3 --dtype bf16
    python bench/mix_apply.py --size sd15 --repeat 3 --dtype bf16 --device cuda    # GPU

``--loras 1,10,50`` measures stacks of many LoRAs instead (``bench/mix_many.py``):

    python bench/mix_apply.py --size sd15 --loras 1,10,50 --rank-range 16,128 --repeat 3
"""

from __future__ import annotations

import argparse
import ctypes
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (machine_summary, median, print_table, quiet_libraries, ratio_line,  # noqa: E402
                          safe_ratio, sync, time_call)

SIZES = {
    # model, LoRA rank, latent side for the render step, untimed warm-up forwards
    "tiny": dict(model="demo", rank=8, latent=16),
    "sd15": dict(model="sd15", rank=128, latent=64),
}
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


# --------------------------------------------------------------------------- the LoRA file
def write_attention_lora(pipe, path: Path, rank: int, seed: int = 0, dtype=None) -> dict:
    """A kohya LoRA over all attention projections of ``pipe`` with random factors; returns facts about it."""
    import torch

    from lora_studio.family import family_of_pipeline
    from lora_studio.lora.formats import LoraModule
    from lora_studio.lora.writer import kohya_metadata, save_kohya_lora
    from lora_studio.lora.keys import kohya_module_name

    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for prefix, model, targets in (("lora_unet_", pipe.unet, UNET_TARGETS), ("lora_te_", pipe.text_encoder, TE_TARGETS)):
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
                r = min(rank, m.in_features, m.out_features)
                down = torch.randn(r, m.in_features, generator=gen) * 0.02
                up = torch.randn(m.out_features, r, generator=gen) * 0.02
                kname = kohya_module_name(prefix, name)
                modules[kname] = LoraModule.from_updown(kname, down, up, alpha=r / 2)
    meta = kohya_metadata(family=family_of_pipeline(pipe), rank=rank, alpha=rank / 2, title=path.stem, resolution=512)
    save_kohya_lora(modules, path, meta, dtype=dtype or torch.float16)
    return {"modules": len(modules), "bytes": path.stat().st_size}


# --------------------------------------------------------------------------- counting opens
class OpenWatcher:
    """Counts opens and reads of one file by any process, through Linux inotify (ctypes; no package does
    this for one file without a thread). ``count()`` returns (opens, reads) since the last call."""

    IN_ACCESS, IN_OPEN = 0x1, 0x20

    def __init__(self, path: Path) -> None:
        self.fd = -1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if self.fd >= 0 and libc.inotify_add_watch(self.fd, str(path).encode(), self.IN_ACCESS | self.IN_OPEN) < 0:
                os.close(self.fd)
                self.fd = -1
        except (OSError, AttributeError):
            self.fd = -1

    @property
    def works(self) -> bool:
        return self.fd >= 0

    def count(self) -> tuple[int, int] | None:
        if self.fd < 0:
            return None
        opens = reads = 0
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            pos = 0
            while pos + 16 <= len(buf):
                _, mask, _, length = struct.unpack_from("iIII", buf, pos)
                opens += bool(mask & self.IN_OPEN)
                reads += bool(mask & self.IN_ACCESS)
                pos += 16 + length
        return opens, reads


# --------------------------------------------------------------------------- the two ways
def _moved_away(path: Path):
    """Context: the file is renamed while inside, so reading it by name would fail."""
    class _Away:
        def __enter__(self):
            self.away = path.with_name(path.name + ".away")
            os.replace(path, self.away)

        def __exit__(self, *exc):
            os.replace(self.away, path)

    return _Away()


def _probe_weights(pipe) -> dict:
    """A few weights the LoRA touches (first UNet attn1 to_q, first TE q_proj), copied."""
    unet_w = next(m.weight for n, m in pipe.unet.named_modules() if n.endswith("attn2.to_k") and hasattr(m, "weight"))
    te_w = next(m.weight for n, m in pipe.text_encoder.named_modules() if n.endswith("q_proj") and hasattr(m, "weight"))
    return {"unet": unet_w.detach().float().cpu().clone(), "te": te_w.detach().float().cpu().clone()}


def _timed(pipe, path: Path, watcher: OpenWatcher, apply, change, undo) -> dict:
    """Time ``apply()`` (load + apply at strength 1) and ``change()`` (to strength 0.5, with the file renamed
    away), counting file opens and reads of each; ``undo()`` then gives the pipeline back."""
    watcher.count()
    t0 = time.perf_counter()
    apply()
    sync(pipe.device.type)
    t_apply = time.perf_counter() - t0
    probe = _probe_weights(pipe)
    load_events = watcher.count()
    with _moved_away(path):
        t0 = time.perf_counter()
        change()
        sync(pipe.device.type)
        t_change = time.perf_counter() - t0
    events = watcher.count()
    undo()
    return {"apply_s": t_apply, "change_s": t_change, "change_events": events, "load_events": load_events,
            "probe": probe}


def ours_once(pipe, path: Path, watcher: OpenWatcher) -> dict:
    from lora_studio.mix import LoraMixer

    held = {}

    def apply():
        held["mixer"] = mixer = LoraMixer(pipe)
        held["name"] = mixer.add(path, strength=1.0)
        mixer.apply()

    def change():
        held["mixer"].set_strength(held["name"], unet=0.5, te=0.5)
        held["mixer"].apply()

    return _timed(pipe, path, watcher, apply, change, lambda: held["mixer"].restore())


def diffusers_once(pipe, path: Path, watcher: OpenWatcher, adapter: str) -> dict:
    def apply():
        pipe.load_lora_weights(str(path), adapter_name=adapter)
        pipe.set_adapters([adapter], [1.0])
        pipe.fuse_lora(adapter_names=[adapter])

    def change():
        pipe.unfuse_lora()
        pipe.set_adapters([adapter], [0.5])
        pipe.fuse_lora(adapter_names=[adapter])

    def undo():
        pipe.unfuse_lora()
        pipe.unload_lora_weights()

    return _timed(pipe, path, watcher, apply, change, undo)


def render_steps(pipe, path: Path, latent: int, repeat: int) -> dict[str, float]:
    """Median seconds of one UNet forward: bare, ours (fused into the weights), diffusers unfused / fused.

    The four are measured in rounds (one timed forward each per round), so drift in machine load hits all alike."""
    import torch

    from lora_studio.mix import LoraMixer

    unet = pipe.unet
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, latent, latent, generator=gen).to(unet.device, unet.dtype)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen).to(unet.device, unet.dtype)
    t = torch.tensor([500], device=unet.device)

    def step() -> float:
        """One untimed forward first: the first forward after weights change pays one-off costs (about +30%
        for SD1.5 on the CPU here, whichever way the weights were written), which is not a per-step cost."""
        with torch.no_grad():
            return time_call(lambda: unet(x, t, encoder_hidden_states=ctx), warmup=1, device=unet.device.type)[0]

    step()  # warm-up
    times: dict[str, list[float]] = {"bare": [], "ours (fused weights)": [], "diffusers unfused": [],
                                     "diffusers fused": []}
    mixer = LoraMixer(pipe)
    mixer.add(path, strength=1.0)
    for r in range(repeat):
        times["bare"].append(step())
        mixer.apply()
        times["ours (fused weights)"].append(step())
        mixer.restore()
        pipe.load_lora_weights(str(path), adapter_name=f"render{r}")
        pipe.set_adapters([f"render{r}"], [1.0])
        times["diffusers unfused"].append(step())
        pipe.fuse_lora(adapter_names=[f"render{r}"])
        times["diffusers fused"].append(step())
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
    return {k: median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each operation; the median is shown")
    p.add_argument("--rank", type=int, help="LoRA rank (default: the size's)")
    p.add_argument("--latent", type=int, help="latent side for the render step (default: the size's)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the pipeline's weight dtype")
    p.add_argument("--device", default="cpu", help="where the pipeline lives (cpu, cuda); the LoRA file is "
                   "read from disk either way")
    p.add_argument("--loras", help="comma-separated LoRA counts (1,10,50): time stacks of that many LoRAs instead")
    p.add_argument("--rank-range", default="16,128", help="with --loras: each LoRA's rank is drawn from LO,HI")
    a = p.parse_args(argv)
    quiet_libraries()
    import torch

    from bench.shapes import pipeline_for

    size = dict(SIZES[a.size])
    size.update({k: getattr(a, k) for k in ("rank", "latent") if getattr(a, k) is not None})
    print(machine_summary())
    t0 = time.perf_counter()
    pipe = pipeline_for(size["model"])
    weight_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    pipe.to(a.device, weight_dtype)
    build_s = time.perf_counter() - t0
    if a.loras:
        from bench.mix_many import run_many

        counts = [int(c) for c in a.loras.split(",")]
        lo, hi = (int(r) for r in a.rank_range.split(","))
        with tempfile.TemporaryDirectory(prefix="bench-mix-many-") as tmp:
            return run_many(pipe, Path(tmp), counts, (lo, hi), a.repeat, write_attention_lora, _probe_weights,
                            f"size {a.size}: {size['model']} model in {a.dtype} on {a.device}")
    with tempfile.TemporaryDirectory(prefix="bench-mix-") as tmp:
        path = Path(tmp) / f"attn-r{size['rank']}.safetensors"
        info = write_attention_lora(pipe, path, size["rank"])
        print(f"size {a.size}: {size['model']} model in {a.dtype} on {a.device} (built in {build_s:.0f}s), kohya LoRA rank {size['rank']}, "
              f"{info['modules']} modules, {info['bytes'] / 2**20:.1f} MiB fp16; median of {a.repeat}")
        path.read_bytes()  # warm the page cache for both sides
        watcher = OpenWatcher(path)
        base = _probe_weights(pipe)
        ours, theirs = [], []
        for r in range(a.repeat):
            if r % 2 == 0:
                ours.append(ours_once(pipe, path, watcher))
                theirs.append(diffusers_once(pipe, path, watcher, f"bench{r}"))
            else:
                theirs.append(diffusers_once(pipe, path, watcher, f"bench{r}"))
                ours.append(ours_once(pipe, path, watcher))
        agree = max(float((ours[0]["probe"][k] - theirs[0]["probe"][k]).abs().max()) for k in ("unet", "te"))
        moved = min(float((ours[0]["probe"][k] - base[k]).abs().max()) for k in ("unet", "te"))
        render = render_steps(pipe, path, size["latent"], a.repeat)

    def events(runs, key):
        if runs[0][key] is None:
            return "n/a (no inotify)"
        return f"{max(r[key][0] for r in runs)} opens, {max(r[key][1] for r in runs)} reads"

    ours_apply, their_apply = median([r["apply_s"] for r in ours]), median([r["apply_s"] for r in theirs])
    ours_change, their_change = median([r["change_s"] for r in ours]), median([r["change_s"] for r in theirs])
    rows = [["ours: LoraMixer add + apply", f"{ours_apply:.3f}", events(ours, "load_events"), f"{ours_change:.3f}",
             events(ours, "change_events")],
            ["diffusers: load_lora_weights + set_adapters + fuse_lora", f"{their_apply:.3f}",
             events(theirs, "load_events"), f"{their_change:.3f}", events(theirs, "change_events")]]
    print_table(["apply", "load+apply s", "file access (load)", "strength change s",
                 "file access (change; file moved away)"], rows)
    print(f"same weights: max |W_ours - W_diffusers| = {agree:.2e}; the LoRA moved them by up to {moved:.2e}")
    bare = render["bare"]
    print_table([f"render step (UNet forward, {size['latent']}x{size['latent']} latent)", "s", "vs bare"],
                [[k, f"{v:.4f}", f"{v / bare:.3f}x"] for k, v in render.items()])
    # the weights must agree: exactly up to fp32 rounding, or within a couple of rounding steps of bf16 weights
    tolerance = max(1e-2 * moved, 2 * torch.finfo(weight_dtype).eps * max(float(v.abs().max()) for v in base.values()))
    if agree > tolerance or moved == 0:
        print("ERROR: the two ways wrote different weights (or the LoRA changed nothing)", file=sys.stderr)
        return 1
    print(ratio_line({"load_apply": safe_ratio(ours_apply, their_apply),
                      "strength_change": safe_ratio(ours_change, their_change),
                      "render_step_vs_unfused": safe_ratio(render["ours (fused weights)"], render["diffusers unfused"]),
                      "render_step_vs_fused": safe_ratio(render["ours (fused weights)"], render["diffusers fused"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
