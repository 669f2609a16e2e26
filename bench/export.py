"""Merging a LoRA into a checkpoint and writing one fp16 single file: seconds and peak RSS vs checkpoint size.

The script writes an fp16 original-layout (ldm) checkpoint of the model with random weights, and a kohya
LoRA over every attention projection (rank 128 for ``--size sd15``; see bench/mix_apply.py). Each export runs
in its own process, so its peak resident memory is its own:

* ours: ``lora_studio.export.export_merged_checkpoint(ckpt, [(lora, 1.0)], out, dtype="fp16")``, which for a
  single-file base streams tensor by tensor (``lora_studio/export_stream.py``);
* baseline, the naive script: load the whole state dict, convert it to fp32 copies, add
  ``up @ down * alpha / rank`` per module, convert every tensor to fp16, save.

Both outputs are compared on the merged tensors (they must agree to fp16 rounding).

    python bench/export.py --size tiny --repeat 3
    python bench/export.py --size sd15 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (current_rss_bytes, emit, machine_summary, median, mib, peak_rss_bytes,  # noqa: E402
                          print_table, quiet_libraries, ratio_line, run_worker, safe_ratio)

SIZES = {"tiny": dict(model="demo", rank=8), "sd15": dict(model="sd15", rank=128)}


# --------------------------------------------------------------------------- inputs (parent process)
def write_inputs(model: str, rank: int, folder: Path) -> dict:
    """The fp16 ldm checkpoint, the LoRA, and the kohya-name -> checkpoint-key map the naive merge needs."""
    import torch

    from bench.mix_apply import write_attention_lora
    from bench.shapes import pipeline_for
    from lora_studio.fileio import save_safetensors_atomic
    from lora_studio.ldm import pipeline_to_ldm_state_dict
    from lora_studio.lora.keys import match_modules
    from lora_studio.lora.formats import read_lora

    pipe = pipeline_for(model)
    ckpt, lora = folder / "base.safetensors", folder / "lora.safetensors"
    sd = pipeline_to_ldm_state_dict(pipe)
    by_ptr = {t.data_ptr(): k for k, t in sd.items()}  # the dict shares the pipeline's tensors
    save_safetensors_atomic({k: v.to(torch.float16) for k, v in sd.items()}, ckpt)
    del sd
    write_attention_lora(pipe, lora, rank)
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    names = {}
    for kname, (comp, mname) in match_modules(read_lora(lora), pipe).matched.items():
        names[kname] = by_ptr[comps[comp].get_submodule(mname).weight.data_ptr()]
    (folder / "names.json").write_text(json.dumps(names), encoding="utf-8")
    return {"ckpt": ckpt, "lora": lora, "names": folder / "names.json", "ckpt_bytes": ckpt.stat().st_size,
            "lora_bytes": lora.stat().st_size, "modules": len(names)}


# --------------------------------------------------------------------------- workers
class StageMemory:
    """Samples the resident set every 20 ms in a thread and keeps the highest value per progress stage
    (load / merge / convert / write), to show where an export's peak comes from."""

    def __init__(self) -> None:
        import threading

        self.stage, self.peaks, self._stop = "start", {}, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __call__(self, event) -> None:  # a lora_studio ProgressCallback
        self.stage = event.stage

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            rss = current_rss_bytes()
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def worker_ours(a) -> dict:
    from lora_studio.demo import DEMO_MODEL_DIR
    from lora_studio.export import export_merged_checkpoint

    idle = current_rss_bytes()
    t0 = time.perf_counter()
    with StageMemory() as stages:
        export_merged_checkpoint(a.ckpt, [(a.lora, 1.0)], a.out, fmt="single_file", dtype="fp16", progress=stages,
                                 config_dir=str(DEMO_MODEL_DIR) if a.model == "demo" else None)
    return {"seconds": time.perf_counter() - t0, "peak_rss": peak_rss_bytes(), "idle_rss": idle,
            "stages": stages.peaks}


def worker_naive(a) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    idle = current_rss_bytes()
    t0 = time.perf_counter()
    names = json.loads(Path(a.names).read_text(encoding="utf-8"))
    sd = load_file(a.ckpt)
    sd = {k: v.to(torch.float32) for k, v in sd.items()}
    lora = load_file(a.lora)
    for kname, key in names.items():
        down, up = lora[f"{kname}.lora_down.weight"].float(), lora[f"{kname}.lora_up.weight"].float()
        alpha = float(lora[f"{kname}.alpha"])
        sd[key] += (up @ down) * (alpha / down.shape[0])
    out = {k: v.to(torch.float16) for k, v in sd.items()}
    save_file(out, a.out)
    return {"seconds": time.perf_counter() - t0, "peak_rss": peak_rss_bytes(), "idle_rss": idle}


def _compare(ours: Path, naive: Path, names: Path) -> tuple[float, int]:
    """Largest difference between the two outputs over the merged tensors, and how many keys each has."""
    from safetensors import safe_open

    keys = set(json.loads(names.read_text(encoding="utf-8")).values())
    worst = 0.0
    with safe_open(str(ours), "pt") as fo, safe_open(str(naive), "pt") as fn:
        missing = set(fn.keys()) - set(fo.keys())
        if missing:
            raise RuntimeError(f"our export lacks {len(missing)} keys, e.g. {sorted(missing)[:3]}")
        for k in sorted(keys):
            worst = max(worst, float((fo.get_tensor(k).float() - fn.get_tensor(k).float()).abs().max()))
        return worst, len(list(fo.keys()))


# --------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--repeat", type=int, default=3, help="exports per variant; the median is shown")
    p.add_argument("--rank", type=int, help="LoRA rank (default: the size's)")
    p.add_argument("--worker", choices=("ours", "naive"), help=argparse.SUPPRESS)
    for name in ("ckpt", "lora", "names", "out", "model"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    quiet_libraries()
    if a.worker:
        emit((worker_ours if a.worker == "ours" else worker_naive)(a))
        return 0
    size = dict(SIZES[a.size])
    if a.rank:
        size["rank"] = a.rank
    print(machine_summary())
    script = Path(__file__).resolve()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        inp = write_inputs(size["model"], size["rank"], folder)
        import gc

        gc.collect()
        print(f"size {a.size}: {size['model']} model, fp16 checkpoint {inp['ckpt_bytes'] / 2**20:,.1f} MiB, "
              f"LoRA rank {size['rank']} over {inp['modules']} modules ({inp['lora_bytes'] / 2**20:.1f} MiB); "
              f"inputs written in {time.perf_counter() - t0:.0f}s; median of {a.repeat}")
        runs: dict[str, list[dict]] = {"ours": [], "naive": []}
        outs = {v: folder / f"out-{v}.safetensors" for v in runs}
        for r in range(a.repeat):
            for variant in (("ours", "naive") if r % 2 == 0 else ("naive", "ours")):
                args = ["--worker", variant, "--ckpt", inp["ckpt"], "--lora", inp["lora"], "--names", inp["names"],
                        "--out", outs[variant], "--model", size["model"]]
                runs[variant].append(run_worker(script, args))
        worst, nkeys = _compare(outs["ours"], outs["naive"], inp["names"])
    ck = inp["ckpt_bytes"]
    rows, med = [], {}
    for variant, label in (("ours", "ours: export_merged_checkpoint"), ("naive", "naive: load, fp32 copies, merge, save")):
        m = {k: median([r[k] for r in runs[variant]]) for k in ("seconds", "peak_rss", "idle_rss")}
        med[variant] = m
        rows.append([label, f"{m['seconds']:.2f}", mib(m["peak_rss"]), f"{m['peak_rss'] / ck:.2f}x",
                     mib(m["idle_rss"]), f"{(m['peak_rss'] - m['idle_rss']) / ck:.2f}x"])
    print_table(["export (fp16 single file)", "seconds", "peak RSS MiB", "peak / ckpt", "RSS after imports MiB",
                 "(peak - imports) / ckpt"], rows)
    stages = runs["ours"][0]["stages"]
    print("ours, sampled RSS peak by export stage (MiB; first run): "
          + ", ".join(f"{k} {mib(v)}" for k, v in stages.items()))
    print(f"outputs agree on the {inp['modules']} merged tensors: max |ours - naive| = {worst:.2e} "
          f"({nkeys} tensors in our file)")
    print(ratio_line({"seconds": safe_ratio(med["ours"]["seconds"], med["naive"]["seconds"]),
                      "peak_rss": safe_ratio(med["ours"]["peak_rss"], med["naive"]["peak_rss"]),
                      "peak_rss_vs_ckpt": med["ours"]["peak_rss"] / ck}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
