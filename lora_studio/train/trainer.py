"""The training loop: peft LoRA layers on a frozen base, optimised with accelerate.

Like minGPT's trainer it knows nothing about the UI: it reports through ``progress``, ``TrainCallbacks`` and
stops at the next step when a ``StopFlag`` is raised (saving the LoRA and a resumable state first).
Multi-GPU runs go through ``accelerate launch``: each process takes every n-th batch of the same seeded order.
"""

from __future__ import annotations

import math
import random
import warnings
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from peft.helpers import disable_input_dtype_casting

from ..errors import ConfigError, TrainingError
from ..family import Family, family_of_pipeline
from ..models import load_base
from ..progress import ProgressCallback, StopFlag, report
from ..lora.keys import TE1_PREFIX, TE2_PREFIX, TE_PREFIX, UnetLayout
from .adapters import (InjectedLora, count_parameters, inject_lora, remove_lora, skips_input_casts,
                       to_kohya_modules)
from .cache import LatentCache
from .conditioning import Conditioner
from .config import TrainConfig
from .dataset import BucketBatches, scan_images, tag_frequency, transform_caption
from .lean import lean_backward
from .objective import diffusion_loss, sample_noise
from .outputs import RunWriter
from .placement import Offloader, Placement, frozen_dtypes, wants_channels_last
from .save import resume_run
from .tracking import Curves, accelerator_kwargs, check_log_with
from .validation import Validator, validation_items


@dataclass
class TrainCallbacks:
    """Optional hooks; each is called in the training thread."""

    on_step: Callable[[int, float], None] | None = None     # (step, loss) after every optimizer step
    on_sample: Callable[[int, Path], None] | None = None    # (step, sample grid PNG)
    on_save: Callable[[int, Path], None] | None = None      # (step, LoRA file)


@dataclass
class TrainResult:
    lora_path: Path
    steps_done: int
    losses: list[float]
    run_dir: Path
    stopped: bool = False
    trainable_params: int = 0
    base_params: int = 0
    samples: list[Path] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(1, self.base_params)


class _NonFinite(Exception):
    pass


def _make_optimizer(cfg: TrainConfig, groups: list[dict], device: torch.device | str = "cpu"):
    kw = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        if cfg.fused_optimizer and torch.device(device).type == "cuda":
            try:  # one kernel for every LoRA tensor's update instead of a loop of small ones
                return torch.optim.AdamW(groups, fused=True, **kw)
            except (RuntimeError, TypeError, ValueError) as err:
                warnings.warn(f"fused AdamW is not available here ({err}); using the standard AdamW.", stacklevel=2)
        return torch.optim.AdamW(groups, **kw)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optimizer = 'adamw8bit' needs the bitsandbytes package, which is not installed. "
                              "Install it (pip install bitsandbytes; it needs a GPU) or use optimizer 'adamw'.") from None
        return bnb.optim.AdamW8bit(groups, **kw)
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise ConfigError("optimizer = 'prodigy' needs the prodigyopt package, which is not installed. "
                          "Install it (pip install prodigyopt) or use optimizer 'adamw'.") from None
    return Prodigy(groups, **kw)  # Prodigy picks its own step size; learning rates near 1.0 are its usual setting


def _maybe_compile(unet, enabled: bool, device: torch.device | str, mode: str = "default"):
    """``torch.compile(unet, mode=mode)`` on CUDA when asked; elsewhere the UNet itself and a warning (compiling
    on a CPU costs far more than it saves). Each new bucket shape compiles again; what it gains on a GPU, and
    after how long, is in bench/RESULTS.md."""
    if not enabled:
        return unet
    if torch.device(device).type != "cuda":
        warnings.warn("compile_unet is on but training runs on the CPU; torch.compile is only used on CUDA "
                      "(on a CPU it compiles for minutes and the step gets no faster). Training without it.",
                      stacklevel=2)
        return unet
    return torch.compile(unet, mode=None if mode == "default" else mode)


def _uses_cuda_graphs(compiled: bool, mode: str) -> bool:
    return compiled and mode in ("reduce-overhead", "max-autotune")


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    mp = cfg.mixed_precision
    if mp == "fp16" and not torch.cuda.is_available():
        warnings.warn("mixed_precision 'fp16' needs a CUDA GPU; training in full precision on the CPU.", stacklevel=3)
        mp = "no"
    # accelerate keeps one process-wide state and refuses a second Accelerator with other precision settings;
    # a long-lived process (the GUI, tests) trains many runs, so drop that state (not the distributed setup).
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available(), **accelerator_kwargs(cfg))


def train(config: TrainConfig, progress: ProgressCallback | None = None, stop: StopFlag | None = None,
          callbacks: TrainCallbacks | None = None, pipeline=None, give_back: bool = True) -> TrainResult:
    """Train a LoRA as ``config`` says and write it under ``config.run_dir()``.

    ``pipeline``: an already loaded base pipeline to train on instead of loading ``config.base``; its weights are
    left exactly as they were (the LoRA layers are taken out again, and weights that were cast, moved or put in
    channels-last get their original tensors back, when training ends, however it ends). That means keeping the
    original tensors beside the cast ones for the whole run (on the CPU; off the GPU they are copied there);
    ``give_back=False`` hands the pipeline over instead, as a loaded base is: its weights may stay cast or moved,
    and no second copy is kept (the LoRA layers are still taken out).
    """
    cfg = config
    cfg.validate()
    if not cfg.data_dir:
        raise ConfigError("data_dir is empty: give the folder of training images (--data DIR).")
    callbacks = callbacks or TrainCallbacks()
    check_log_with(cfg.log_with)

    items, val_items = validation_items(cfg, scan_images(cfg.data_dir, cfg.caption_extension, cfg.trigger_word))
    pipe = pipeline if pipeline is not None else load_base(cfg.base, progress=progress).pipe
    family = family_of_pipeline(pipe)
    accelerator = _make_accelerator(cfg)
    device = accelerator.device
    batches = BucketBatches(items, cfg.batch_size, cfg.seed, cfg.resolution, cfg.enable_buckets,
                            cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_step)
    writer = RunWriter(cfg, cfg.run_dir(), family, batches, tag_frequency(batches.items))

    sdxl = family is Family.SDXL
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else [])
    # Frozen weights in the mixed-precision dtype (cast_frozen_weights), the LoRA weights fp32 (below); a pipeline
    # passed in gets its own tensors back at the end.
    placement = Placement(device, keep_originals=pipeline is not None and give_back)
    offloader = Offloader(device, cfg.offload_cached_models)
    dtypes = frozen_dtypes(str(accelerator.mixed_precision), cfg.cast_frozen_weights, pipe.unet, pipe.vae, encoders,
                           sdxl)
    injected: list[InjectedLora] = []
    try:
        writer.start()
        channels_last = wants_channels_last(cfg.channels_last, device)
        for m in (pipe.unet, pipe.vae, *encoders):
            placement.place(m, dtypes[m], channels_last=channels_last and m is pipe.unet)
        torch.manual_seed(cfg.seed)
        layout = UnetLayout.from_config(pipe.unet.config) if sdxl else None  # kohya's SDXL names
        injected.append(inject_lora(pipe.unet, cfg, cfg.target_modules, "lora_unet_", layout))
        if cfg.train_text_encoder:
            prefixes = [TE1_PREFIX, TE2_PREFIX] if sdxl else [TE_PREFIX]
            for te, prefix in zip(encoders, prefixes):
                injected.append(inject_lora(te, cfg, cfg.text_encoder_target_modules, prefix))
        for p in (p for inj in injected for p in inj.parameters()):
            p.data = p.data.float()
        # every LoRA forward below runs under autocast with fp16/bf16
        casts_off = accelerator.mixed_precision in ("fp16", "bf16") and skips_input_casts(cfg)
        with ExitStack() as stack:
            for inj in injected:
                stack.enter_context(disable_input_dtype_casting(inj.model, active=casts_off))
            stack.enter_context(lean_backward(pipe.unet, cfg.lean_backward))  # after the LoRA layers: it reads
            return _run(cfg, pipe, sdxl, accelerator, device, injected, batches, writer, progress, stop, callbacks,
                        offloader, val_items)
    except BaseException as err:
        writer.discard_if_unused()  # a run that failed before it saved anything leaves no folder behind
        if isinstance(err, torch.OutOfMemoryError):
            raise TrainingError(f"out of GPU memory at batch_size {cfg.batch_size}, resolution {cfg.resolution}: "
                                "lower batch_size or resolution, turn on gradient_checkpointing, or use "
                                "mixed_precision 'fp16'/'bf16'.") from err
        raise
    finally:
        for inj in injected:
            remove_lora(inj)
        offloader.restore()
        placement.restore()
        _restore_modules(cfg, pipe.unet, *encoders)
        accelerator.end_training()  # closes the tracker's event files
        accelerator.free_memory()


def _restore_modules(cfg: TrainConfig, unet, *encoders) -> None:
    """Leave the pipeline's modules as they were: frozen, eval mode, no checkpointing, no mixed-precision
    forward wrapper (``accelerator.prepare`` patches ``forward`` on the instance)."""
    for m in (unet, *encoders):
        m.requires_grad_(False)
        m.eval()
        if m.__dict__.pop("_original_forward", None) is not None:
            m.__dict__.pop("forward", None)
    if cfg.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for te in encoders:
                te.gradient_checkpointing_disable()


def _run(cfg: TrainConfig, pipe, sdxl: bool, accelerator, device, injected: list[InjectedLora],
         batches: BucketBatches, writer: RunWriter, progress, stop, callbacks: TrainCallbacks,
         offloader: Offloader, val_items: list) -> TrainResult:
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    unet = pipe.unet
    unet_inj, te_injs = injected[0], injected[1:]
    trained_tes = [inj.model for inj in te_injs]
    trainable = sum(p.numel() for inj in injected for p in inj.parameters())
    base_params = sum(count_parameters(inj.model) for inj in injected)
    report(progress, "train", 0, cfg.steps, f"trainable parameters: {trainable:,} "
           f"({100.0 * trainable / max(1, base_params):.3f}% of {base_params:,})",
           trainable_params=trainable, base_params=base_params)

    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for te in trained_tes:
            te.gradient_checkpointing_enable()
    groups = [{"params": unet_inj.parameters(), "lr": cfg.learning_rate}]
    if te_injs:
        groups.append({"params": [p for inj in te_injs for p in inj.parameters()], "lr": cfg.text_encoder_lr})
    optimizer = _make_optimizer(cfg, groups, device)
    sched_name = "constant_with_warmup" if cfg.lr_scheduler == "constant" and cfg.lr_warmup_steps else cfg.lr_scheduler
    lr_scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.steps)
    prepared = accelerator.prepare(unet, *trained_tes, optimizer)
    unet_p, tes_p, optimizer = prepared[0], list(prepared[1:-1]), prepared[-1]

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = cfg.prediction_type if cfg.prediction_type != "auto" else noise_scheduler.config.prediction_type
    writer.prediction_type = prediction
    # Encode every image and caption once, before the first step (chunks of the batch size, so the VAE's
    # activations stay within what a step needs), then the VAE and frozen text encoders can leave the GPU.
    latents = LatentCache(pipe.vae, batches.items, cfg.cache_latents, writer.run_dir / "latent-cache", progress,
                          chunk=cfg.batch_size)
    conditioner = Conditioner(pipe, device, sdxl, trained=bool(te_injs), cache=cfg.cache_text_embeddings,
                              encoders=tuple(tes_p))
    # every caption a step can draw (shuffled tags make new ones, so then the encoders stay and cache as they go)
    all_captions = sorted({it.caption for it in batches.items} | ({""} if cfg.caption_dropout_rate > 0 else set()))
    with accelerator.autocast():
        text_cached = not cfg.shuffle_tags and conditioner.precompute(all_captions)
    validator = Validator(cfg, val_items, pipe.vae, conditioner, noise_scheduler, prediction,
                          writer.run_dir / "latent-cache", accelerator) if val_items else None
    offloader.offload(([pipe.vae] if cfg.cache_latents != "none" else [])
                      + ([pipe.text_encoder, getattr(pipe, "text_encoder_2", None)] if text_cached else []))
    step_unet = _maybe_compile(unet_p, cfg.compile_unet, device, cfg.compile_mode)
    # CUDA graphs reuse their output buffers: each step must tell torch a new iteration began
    graphs = _uses_cuda_graphs(step_unet is not unet_p, cfg.compile_mode)

    named = {f"{inj.prefix}::{k}": p for inj in injected for k, p in inj.named_parameters().items()}
    step, losses, lrs = 0, [], []
    curves = Curves(cfg, writer.run_dir, accelerator)
    if cfg.resume:
        step, losses, lrs, info = resume_run(cfg, writer.run_dir, named, optimizer, lr_scheduler, accelerator,
                                             progress)
        curves.restore(info.get("validation", []))
    hint = curves.start()
    if hint:
        report(progress, "train", step, cfg.steps, hint)

    def save_state() -> Path:
        torch_state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                       "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
                       "rng_cpu": torch.get_rng_state(),
                       "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        adapter = {k: p.detach().float().cpu() for k, p in named.items()}
        return writer.save_state(step, adapter, torch_state, losses, lrs, curves.history)

    def modules():
        return {k: m for inj in injected for k, m in to_kohya_modules(inj).items()}

    accum, nproc, rank = cfg.gradient_accumulation_steps, accelerator.num_processes, accelerator.process_index
    params = [p for inj in injected for p in inj.parameters()]
    for m in (unet_p, *tes_p):
        m.train()

    def one_step(step: int) -> float:
        """One optimizer step over ``accum`` micro-batches; returns the mean loss."""
        step_loss = 0.0
        for micro in range(accum):
            micro_index = (step * accum + micro) * nproc + rank
            _, idx = batches.batch(micro_index)
            rng = random.Random(cfg.seed * 1_000_003 + micro_index)
            captions = [transform_caption(batches.items[i].caption, rng, cfg.caption_dropout_rate, cfg.shuffle_tags,
                                          cfg.keep_tokens, cfg.trigger_word) for i in idx]
            x0 = latents.get(idx)
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + micro_index)
            noise, t = sample_noise(x0, gen, noise_scheduler.config.num_train_timesteps, cfg.noise_offset)
            x0, noise, t = x0.to(device), noise.to(device), t.to(device)
            noisy = noise_scheduler.add_noise(x0, noise, t)
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            sync = accelerator.no_sync(unet_p) if micro < accum - 1 and nproc > 1 else nullcontext()
            with sync:
                with accelerator.autocast():
                    states, added = conditioner(captions, [batches.items[i] for i in idx])
                    pred = step_unet(noisy, t, encoder_hidden_states=states, added_cond_kwargs=added).sample
                    loss = diffusion_loss(pred, x0, noise, t, noise_scheduler, prediction, cfg.min_snr_gamma)
                accelerator.backward(loss / accum)
            # the one host sync of a micro-batch; a non-finite loss stops before the optimizer sees its gradients
            value = float(loss.detach())
            if not math.isfinite(value):
                raise _NonFinite(value)
            step_loss += value / accum
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return step_loss

    stopped = False
    while step < cfg.steps:
        if stop is not None and stop.requested:
            stopped = True
            break
        lr = optimizer.param_groups[0]["lr"]
        try:
            step_loss = one_step(step)
        except _NonFinite as err:
            optimizer.zero_grad(set_to_none=True)
            writer.finish(losses, lrs)
            kept = f"the last good save is {writer.last_good}" if writer.last_good else "nothing had been saved yet"
            raise TrainingError(f"the loss became {err.args[0]} at step {step + 1}; training stopped and {kept}. "
                                f"Lower the learning rate (it is {cfg.learning_rate:g}), use mixed_precision 'bf16' "
                                "or 'no' instead of 'fp16', or set max_grad_norm to 1.") from None
        step += 1
        losses.append(step_loss)
        lrs.append(lr)
        report(progress, "train", step, cfg.steps, f"loss {step_loss:.4f} lr {lr:.2e}", loss=step_loss, lr=lr)
        curves.log_step(step, step_loss, lr)
        if callbacks.on_step:
            callbacks.on_step(step, step_loss)
        if not accelerator.is_main_process:
            continue
        epoch_end = _epoch_ended(step, accum * nproc, batches.batches_per_epoch)
        if step < cfg.steps and ((cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0)
                                 or (cfg.save_every_n_epochs and epoch_end
                                     and epoch_end % cfg.save_every_n_epochs == 0)):
            path = writer.save_lora(modules(), step, final=False)
            if callbacks.on_save:
                callbacks.on_save(step, path)
        if validator and cfg.validate_every_n_steps and step % cfg.validate_every_n_steps == 0 and step < cfg.steps:
            value = validator(unet_p, (unet_p, *tes_p), accelerator)
            curves.validated(step, value, lambda: writer.lora_at(step, modules))
        if cfg.save_state_every_n_steps and step % cfg.save_state_every_n_steps == 0 and step < cfg.steps:
            save_state()
        if cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0 and cfg.sample_prompts:
            for m in (unet_p, *tes_p):
                m.eval()
            with offloader.on_device(), accelerator.autocast():
                grid = writer.sample(pipe, step)
            for m in (unet_p, *tes_p):
                m.train()
            if callbacks.on_sample:
                callbacks.on_sample(step, grid)

    lora_path = writer.save_lora(modules(), step, final=not stopped)
    if validator and not stopped and accelerator.is_main_process:
        curves.validated(step, validator(unet_p, (unet_p, *tes_p), accelerator), lambda: lora_path)
    if stopped:
        save_state()
    writer.finish(losses, lrs)
    if callbacks.on_save:
        callbacks.on_save(step, lora_path)
    report(progress, "train", step, cfg.steps, f"{'stopped' if stopped else 'done'}: {lora_path}")
    return TrainResult(lora_path, step, losses, writer.run_dir, stopped, trainable, base_params, writer.samples)


def _epoch_ended(step: int, batches_per_step: int, batches_per_epoch: int) -> int:
    """The number of the epoch that ended during ``step`` (1-based), or 0."""
    before = ((step - 1) * batches_per_step) // batches_per_epoch
    after = (step * batches_per_step) // batches_per_epoch
    return after if after > before else 0
