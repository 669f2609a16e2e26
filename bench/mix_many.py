"""``mix_apply.py --loras 1,10,50``: many LoRAs stacked at once, as people do with a library, in LoraMixer and in
diffusers, on the same pipeline.

For each count N it writes N kohya LoRAs over the model's attention projections (random factors, each with its
own rank drawn from ``--rank-range``, seeded), then measures

* load: ``LoraMixer.add`` of each + one ``apply`` vs ``load_lora_weights(adapter_name=...)`` of each +
  ``set_adapters`` + ``fuse_lora``;
* a strength change of one LoRA (the first) and applying it, median of ``--repeat``: ``set_strength`` +
  ``apply`` vs ``unfuse_lora`` + ``set_adapters`` (every name, one weight changed) + ``fuse_lora``, the way a
  user re-weights a fused stack in diffusers.

Both ways' weights are compared after the last change (they must agree). The ratio line has
``change_flat_ours`` (our change at the largest count over our change at the smallest) and ours/diffusers at
each count.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from bench.common import median, print_table, ratio_line, safe_ratio, sync


def write_loras(pipe, folder: Path, count: int, ranks: tuple[int, int], write, seed: int = 0) -> list[Path]:
    """``count`` LoRA files with ranks drawn (seeded) from ``ranks`` (inclusive)."""
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        rank = rng.randint(*ranks)
        path = folder / f"stack{i:03d}-r{rank}.safetensors"
        write(pipe, path, rank, seed=1000 + i)
        paths.append(path)
    return paths


def _strength(k: int) -> float:
    return 0.5 if k % 2 == 0 else 0.7


def ours(pipe, paths: list[Path], repeat: int, probe) -> dict:
    from lora_studio.mix import LoraMixer

    t0 = time.perf_counter()
    mixer = LoraMixer(pipe)
    names = [mixer.add(p, strength=1.0) for p in paths]
    mixer.apply()
    sync(pipe.device.type)
    load_s = time.perf_counter() - t0
    changes = []
    for k in range(-1, repeat):  # one untimed change first: a slider moves many times
        t0 = time.perf_counter()
        mixer.set_strength(names[0], unet=_strength(k), te=_strength(k))
        mixer.apply()
        sync(pipe.device.type)
        changes.append(time.perf_counter() - t0)
    changes = changes[1:]
    weights = probe(pipe)
    mixer.restore()
    return {"load_s": load_s, "change_s": median(changes), "probe": weights}


def diffusers(pipe, paths: list[Path], repeat: int, probe) -> dict:
    names = [f"stack{i}" for i in range(len(paths))]
    t0 = time.perf_counter()
    for name, p in zip(names, paths):
        pipe.load_lora_weights(str(p), adapter_name=name)
    pipe.set_adapters(names, [1.0] * len(names))
    pipe.fuse_lora(adapter_names=names)
    sync(pipe.device.type)
    load_s = time.perf_counter() - t0
    changes = []
    for k in range(-1, repeat):
        t0 = time.perf_counter()
        pipe.unfuse_lora()
        pipe.set_adapters(names, [_strength(k)] + [1.0] * (len(names) - 1))
        pipe.fuse_lora(adapter_names=names)
        sync(pipe.device.type)
        changes.append(time.perf_counter() - t0)
    changes = changes[1:]
    weights = probe(pipe)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    return {"load_s": load_s, "change_s": median(changes), "probe": weights}


def run_many(pipe, tmp: Path, counts: list[int], ranks: tuple[int, int], repeat: int, write, probe,
             describe: str) -> int:
    paths = write_loras(pipe, tmp, max(counts), ranks, write)
    mib = sum(p.stat().st_size for p in paths) / 2**20
    print(f"{describe}; {max(counts)} LoRAs of rank {ranks[0]}-{ranks[1]} over every attention projection, "
          f"{mib:.0f} MiB fp16 in all; strength change: median of {repeat} after one untimed")
    for p in paths:
        p.read_bytes()  # warm the page cache for both sides
    rows, ratios, results = [], {}, {}
    worst = 0.0
    for n in sorted(counts):
        a = ours(pipe, paths[:n], repeat, probe)
        b = diffusers(pipe, paths[:n], repeat, probe)
        results[n] = (a, b)
        worst = max(worst, *(float((a["probe"][k] - b["probe"][k]).abs().max()) for k in a["probe"]))
        rows.append([str(n), f"{a['load_s']:.3f}", f"{b['load_s']:.3f}", f"{a['change_s']:.3f}",
                     f"{b['change_s']:.3f}"])
        ratios[f"load@{n}"] = safe_ratio(a["load_s"], b["load_s"])
        ratios[f"change@{n}"] = safe_ratio(a["change_s"], b["change_s"])
    print_table(["LoRAs", "ours load+apply s", "diffusers load+fuse s", "ours change s", "diffusers change s"], rows)
    lo, hi = min(counts), max(counts)
    print(f"change at {hi} vs {lo} LoRAs: ours {results[hi][0]['change_s'] / results[lo][0]['change_s']:.2f}x, "
          f"diffusers {results[hi][1]['change_s'] / results[lo][1]['change_s']:.2f}x")
    print(f"same weights: max |W_ours - W_diffusers| = {worst:.2e}")
    if worst > 1e-3:
        print("ERROR: the two ways wrote different weights", file=sys.stderr)
        return 1
    ratios = {"change_flat_ours": results[hi][0]["change_s"] / results[lo][0]["change_s"], **ratios}
    print(ratio_line(ratios))
    return 0
