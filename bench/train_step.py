"""Training step throughput and peak memory: LoRA Studio's trainer vs the diffusers example loop.

The baseline re-implements ``examples/text_to_image/train_text_to_image_lora.py`` (and its SDXL sibling for
``--size sdxl``) at the same settings: frozen weights cast to the mixed-precision dtype, peft LoRA on
to_q/to_k/to_v/to_out.0 through ``unet.add_adapter`` (alpha = rank, Gaussian init), AdamW, constant LR,
grad-norm clip 1.0, and every step: decode + resize + crop + flip the images, VAE-encode them
(``latent_dist.sample()``), run the text encoder(s), one UNet forward/backward. No caching.

Ours is ``lora_studio.train.train`` on the same fp32 pipeline, handed over (``give_back=False``, as the
baseline owns its pipeline), with its speed switches (all defaults but
compile): latents and every caption's text states encoded once before the first step (excluded from steps/s,
reported as setup seconds), frozen weights cast to the mixed-precision dtype with fp32 LoRA weights
(``cast_frozen_weights``), frozen convolutions, norms, SiLUs and GEGLUs that keep less for the backward
(``lean_backward``),
SDPA attention (diffusers' default processor), and on CUDA a channels-last UNet
(``channels_last``), fused AdamW (``fused_optimizer``), the VAE and text encoder moved to the CPU once cached
(``offload_cached_models``); ``--compile`` adds ``torch.compile`` of the UNet (``compile_unet``, CUDA only).

Each (variant, batch size, repetition) runs in its own process so peak memory is its own:
``torch.cuda.max_memory_allocated`` on a GPU, the resident high-water mark on the CPU.

    python bench/train_step.py --size tiny --repeat 3
    python bench/train_step.py --size sd15 --repeat 3        # GPU
    python bench/train_step.py --size sd15 --repeat 3 --compile
    python bench/train_step.py --size sd15 --repeat 1 --batches 1 --profile 3   # where a step goes
    python bench/train_step.py --size sd15 --repeat 1 --batches 1 --compile --compile-mode reduce-overhead
    python bench/train_step.py --size sd15 --resolution 512 --batches 1 --steps 1 --repeat 1 --precision bf16 \
        --cuda-autocast    # on a CPU: what a GPU step keeps for its backward ("kept for backward MiB")
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (SavedActivations, StepProfiler, emit, emulate_cuda_autocast, machine_summary,  # noqa: E402
                          measured_matmul_tflops, median, mib, peak_rss_bytes, print_table, quiet_libraries,
                          ratio_line, run_worker, safe_ratio)

SIZES = {
    # model, resolution, batch sizes, mixed precision, warm-up steps, timed steps, dataset images
    "tiny": dict(model="demo", resolution=64, batches=(1, 4), precision="no", warmup=2, steps=6, images=24),
    "sd15": dict(model="sd15", resolution=512, batches=(1, 4), precision="bf16", warmup=3, steps=12, images=8),
    "sdxl": dict(model="sdxl", resolution=1024, batches=(1, 2), precision="bf16", warmup=3, steps=10, images=8),
}
RANK = 16
# the trainer's speed switches "ours" runs with (its defaults; compile_unet comes from --compile)
OURS_SWITCHES = dict(cast_frozen_weights=True, channels_last=True, fused_optimizer=True, offload_cached_models=True,
                     lean_backward=True)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LR = 1e-4


# =========================================================================== workers
def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(precision: str):
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _peak(device: str) -> tuple[int, str]:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated()), "cuda max_memory_allocated"
    return peak_rss_bytes(), "process peak RSS"


def _rates(times: list[float], warmup: int, batch: int) -> dict:
    """Steps/s from the median step time after warm-up (robust to other work on a shared machine)."""
    steps = [b - a for a, b in zip(times[warmup - 1:], times[warmup:])]
    sps = 1.0 / median(steps)
    return {"steps_per_s": sps, "images_per_s": sps * batch}


def worker_ours(a) -> dict:
    import torch

    from bench.shapes import pipeline_for
    from lora_studio.train import trainer as tr
    from lora_studio.train.config import TrainConfig

    device = _device()
    pipe = pipeline_for(a.model)  # fp32 on the CPU, as for the baseline; the trainer casts and moves it
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = Path(tempfile.mkdtemp(prefix="bench-ours-"))
    cfg = TrainConfig(data_dir=a.data, output_dir=str(out), run_name="bench", resolution=a.resolution,
                      rank=RANK, alpha=float(RANK), target_modules=list(TARGETS),
                      steps=a.warmup + a.steps + a.profile + 1,
                      batch_size=a.batch, learning_rate=LR, mixed_precision=a.precision, cache_latents="memory",
                      cache_text_embeddings=True, seed=0, max_grad_norm=1.0,
                      **{**OURS_SWITCHES, "lean_backward": not a.no_lean},
                      compile_unet=bool(a.compile), compile_mode=a.compile_mode)
    times: list[float] = []
    prof = StepProfiler(device, a.warmup + a.steps, a.profile)
    # the last step: what it keeps for the backward (the pipeline is handed over, so its weights are these)
    acts = SavedActivations(a.warmup + a.steps + a.profile, pipe.unet.parameters)

    def on_step(step: int, loss: float) -> None:
        times.append(time.perf_counter())
        prof.after_step(len(times))
        acts.after_step(len(times))

    t0 = time.perf_counter()
    # handed over (give_back=False) as the baseline owns its pipeline: neither keeps a second copy of the weights
    result = tr.train(cfg, pipeline=pipe, give_back=False, callbacks=tr.TrainCallbacks(on_step=on_step))
    peak, kind = _peak(device)
    timed = times[:a.warmup + a.steps]
    return {**_rates(timed, a.warmup, a.batch), "peak_mem": peak, "mem_kind": kind, "profile": prof.summary(),
            "saved_acts": acts.bytes,
            "setup_s": timed[0] - t0 - (timed[-1] - timed[0]) / (len(timed) - 1), "loss": result.losses[-1]}


def _baseline_images(folder: str):
    paths = sorted(p for p in Path(folder).rglob("*.png"))
    return [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in paths]


def _transform(path: Path, resolution: int, rng) -> "torch.Tensor":
    """Resize (short side, bilinear) + center crop + random flip + to [-1, 1]: the example's torchvision
    transforms, written with PIL and torch (torchvision is not installed here)."""
    import torch
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        s = resolution / min(w, h)
        img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return data.permute(2, 0, 1).float().div(255.0).sub(0.5).div(0.5)


def worker_baseline(a) -> dict:
    import random

    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from bench.shapes import pipeline_for

    device = _device()
    accelerator = Accelerator(mixed_precision=a.precision, cpu=device == "cpu")
    pipe = pipeline_for(a.model)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    unet, vae = pipe.unet, pipe.vae
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if sdxl else [])
    for m in (unet, vae, *encoders):
        m.requires_grad_(False)
    weight_dtype = _dtype(a.precision)
    unet.to(accelerator.device, dtype=weight_dtype)
    # the SDXL example keeps its VAE in fp32 (the SDXL VAE overflows in half precision) unless told otherwise
    vae.to(accelerator.device, dtype=torch.float32 if sdxl else weight_dtype)
    for te in encoders:
        te.to(accelerator.device, dtype=weight_dtype)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS))
    if a.precision == "fp16":
        cast_training_params(unet, dtype=torch.float32)
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    items = _baseline_images(a.data)
    rng = random.Random(0)

    def collate(batch):
        return {"pixel_values": torch.stack([_transform(p, a.resolution, rng) for p, _ in batch]).float(),
                "captions": [c for _, c in batch]}

    loader = torch.utils.data.DataLoader(items, batch_size=a.batch, shuffle=True, collate_fn=collate, drop_last=True)
    total = a.warmup + a.steps + a.profile + 1
    prof = StepProfiler(device, a.warmup + a.steps, a.profile)
    acts = SavedActivations(total - 1, unet.parameters)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=total)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def encode(captions):
        ids = [tok(captions, max_length=tok.model_max_length, padding="max_length", truncation=True,
                   return_tensors="pt").input_ids.to(accelerator.device) for tok in tokenizers]
        if not sdxl:
            return encoders[0](ids[0])[0], None
        states, pooled = [], None
        for te, i in zip(encoders, ids):
            out = te(i, output_hidden_states=True)
            pooled = out[0]
            states.append(out.hidden_states[-2])
        b = len(captions)
        time_ids = torch.tensor([[a.resolution, a.resolution, 0, 0, a.resolution, a.resolution]] * b,
                                device=accelerator.device, dtype=weight_dtype)
        return torch.cat(states, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}

    def forward_loss(batch):
        pixels = batch["pixel_values"].to(accelerator.device)
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
        latents = latents.to(weight_dtype)
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, t.long())
        states, added = encode(batch["captions"])
        pred = unet(noisy, t, states, added_cond_kwargs=added).sample
        return F.mse_loss(pred.float(), noise.float(), reduction="mean"), (noisy, t, states, added)

    unet.train()
    times: list[float] = []
    step, last = 0, None
    while step < total:
        for batch in loader:
            with accelerator.accumulate(unet):
                loss, last = forward_loss(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                loss_value = accelerator.gather(loss.repeat(a.batch)).mean().item()  # the example logs it
                step += 1
                times.append(time.perf_counter())
                prof.after_step(step)
                acts.after_step(step)
            if step >= total:
                break
    peak, kind = _peak(device)
    result = {**_rates(times[:a.warmup + a.steps], a.warmup, a.batch), "peak_mem": peak, "mem_kind": kind,
              "setup_s": 0.0, "loss": loss_value, "profile": prof.summary(), "saved_acts": acts.bytes}
    # Model FLOPs of one step (UNet forward + backward; the same model math for both variants), then the
    # GPU's measured dense bf16 rate: MFU = flops * steps/s / rate.
    from torch.utils.flop_counter import FlopCounterMode

    noisy, t, states, added = last
    with FlopCounterMode(display=False) as counter, accelerator.autocast():
        pred = unet(noisy, t, states, added_cond_kwargs=added).sample
        pred.float().pow(2).mean().backward()
    optimizer.zero_grad()
    result["flops_per_step"] = int(counter.get_total_flops())
    result["matmul_tflops"] = measured_matmul_tflops(device)
    return result


def print_profiles(results: dict, batches, steps: int) -> None:
    """Where a step goes, from each variant's first run (``--profile``)."""
    rows, tops = [], []
    for batch in batches:
        for variant in ("ours", "baseline"):
            pr = results[(variant, batch)][0].get("profile")
            if not pr:
                continue
            busy = pr["gpu_busy_ms"]
            rows.append([variant, batch, f"{pr['step_ms']:.1f}", "n/a" if busy is None else f"{busy:.1f}",
                         "n/a" if busy is None else f"{100 * busy / pr['step_ms']:.0f}%",
                         "n/a" if pr["gpu_ops"] is None else f"{pr['gpu_ops']:,.0f}", f"{pr['aten_ops']:,.0f}"])
            tops += [f"  {variant} b{batch}: {ms:7.2f} ms  {name}" for name, ms in pr["top_gpu"]]
    print(f"where a step goes (torch.profiler over {steps} steps after the timed ones; first run of each):")
    print_table(["variant", "batch", "step ms", "GPU busy ms", "GPU busy", "GPU ops/step", "aten calls/step"], rows)
    if tops:
        print("largest GPU entries per step:")
        print("\n".join(tops))


# =========================================================================== driver
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--repeat", type=int, default=3, help="runs per variant and batch size; the median is shown")
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: the size's)")
    p.add_argument("--steps", type=int, help="timed steps per run (default: the size's)")
    p.add_argument("--warmup", type=int, help="untimed steps before them (default: the size's)")
    p.add_argument("--resolution", type=int, help="image size in px (default: the size's)")
    p.add_argument("--precision", choices=("no", "fp16", "bf16"), help="mixed precision (default: the size's; "
                   "'no' on a CPU)")
    p.add_argument("--compile", action="store_true", help="ours with torch.compile of the UNet (CUDA only; the "
                   "trainer skips it with a warning on a CPU); compiling happens in the first, untimed step")
    p.add_argument("--compile-mode", default="default", help="torch.compile's mode for --compile (default, "
                   "reduce-overhead: CUDA graphs, max-autotune, max-autotune-no-cudagraphs)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="after the timed steps, run N more under "
                   "torch.profiler and show where a step goes (GPU busy time, kernels and aten ops per step)")
    p.add_argument("--no-lean", action="store_true", help="ours without lean_backward (to see what it costs)")
    p.add_argument("--cuda-autocast", action="store_true", help="on a CPU: autocast follows CUDA's per-op rules "
                   "(group/layer norms in fp32), so 'kept for backward' is what the same step keeps on a GPU")
    p.add_argument("--worker", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        quiet_libraries()
        with emulate_cuda_autocast(a.cuda_autocast):
            emit((worker_ours if a.worker == "ours" else worker_baseline)(a))
        return 0
    import torch

    size = dict(SIZES[a.size])
    for key in ("batches", "steps", "warmup", "resolution", "precision", "model"):
        if getattr(a, key) is not None:
            size[key] = getattr(a, key)
    if not torch.cuda.is_available() and size["precision"] != "no" and a.precision is None:
        print(f"note: no GPU; --size {a.size} runs in fp32 on the CPU (pass --precision bf16 to force CPU "
              "autocast)", flush=True)
        size["precision"] = "no"
    size["warmup"] = max(1, size["warmup"])
    print(machine_summary())
    print(f"size {a.size}: {size['model']} model, {size['resolution']} px, rank {RANK}, precision "
          f"{size['precision']}, {size['warmup']} warm-up + {size['steps']} timed steps, median of {a.repeat}")
    cuda = torch.cuda.is_available()
    print("ours: cached latents + text states, " + ", ".join(
        [f"frozen weights in {size['precision']}" if size["precision"] != "no" else "fp32 (no mixed precision)",
         "no lean backward (--no-lean)" if a.no_lean else "lean backward (frozen convs, norms, SiLUs, GEGLUs keep less)"]
        + (["channels-last UNet", "fused AdamW", "VAE/text encoder offloaded after caching"] if cuda else [])
        + ([(f"torch.compile UNet (mode {a.compile_mode})" if cuda else "--compile ignored on the CPU")]
           if a.compile else [])))
    if a.cuda_autocast:
        print("autocast: CUDA's per-op rules on the CPU (--cuda-autocast): norms in fp32, as a GPU step runs them")
    script = Path(__file__).resolve()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        from bench.shapes import write_dataset

        data = write_dataset(tmp, max(size["images"], max(size["batches"])), size["resolution"])
        results: dict[tuple[str, int], list[dict]] = {}
        for batch in size["batches"]:
            for r in range(a.repeat):
                # alternate the order so neither variant always runs first on a warm (or busy) machine
                for variant in (("ours", "baseline") if r % 2 == 0 else ("baseline", "ours")):
                    args = ["--worker", variant, "--data", data, "--batch", batch, "--model", size["model"],
                            "--steps", size["steps"], "--warmup", size["warmup"], "--resolution", size["resolution"],
                            "--precision", size["precision"], "--profile", a.profile,
                            "--compile-mode", a.compile_mode] + (["--compile"] if a.compile else []) \
                        + (["--no-lean"] if a.no_lean else []) \
                        + (["--cuda-autocast"] if a.cuda_autocast else [])
                    results.setdefault((variant, batch), []).append(run_worker(script, args))
    rows, ratios = [], {}
    for batch in size["batches"]:
        med = {}
        for variant in ("ours", "baseline"):
            runs = results[(variant, batch)]
            m = {k: median([run[k] for run in runs])
                 for k in ("steps_per_s", "images_per_s", "peak_mem", "setup_s", "saved_acts")}
            base_runs = results[("baseline", batch)]
            flops = median([run["flops_per_step"] for run in base_runs])
            rate = base_runs[0].get("matmul_tflops")
            m["mfu"] = flops * m["steps_per_s"] / (rate * 1e12) if rate else None
            med[variant] = m
            rows.append([variant, batch, f"{m['steps_per_s']:.3f}", f"{m['images_per_s']:.2f}", mib(m["peak_mem"]),
                         mib(m["saved_acts"]),
                         f"{flops / 1e9:,.1f}", "n/a" if m["mfu"] is None else f"{100 * m['mfu']:.1f}%",
                         f"{m['setup_s']:.1f}"])
        ratios[f"steps_per_s@b{batch}"] = safe_ratio(med["ours"]["steps_per_s"], med["baseline"]["steps_per_s"])
        ratios[f"peak_mem@b{batch}"] = safe_ratio(med["ours"]["peak_mem"], med["baseline"]["peak_mem"])
        ratios[f"saved_acts@b{batch}"] = safe_ratio(med["ours"]["saved_acts"], med["baseline"]["saved_acts"])
    kind = results[("ours", size["batches"][0])][0]["mem_kind"]
    print_table(["variant", "batch", "steps/s", "images/s", f"peak MiB ({kind})", "kept for backward MiB",
                 "GFLOP/step", "MFU", "setup s"], rows)
    if a.profile:
        print_profiles(results, size["batches"], a.profile)
    if not torch.cuda.is_available():
        print("MFU: n/a on the CPU (no measured bf16 matmul rate); GFLOP/step is the UNet forward+backward without "
              "attention (torch's FLOP counter has no formula for the CPU attention kernel).")
    print(ratio_line(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
