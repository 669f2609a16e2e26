"""What a run writes: the kohya LoRA with its metadata, loss.csv + loss.png, and resumable training state (and
reading that state back into a new run, ``resume_run``).

The state is our own small format rather than ``accelerator.save_state`` so that loading it never unpickles
anything but plain tensors (``torch.load(weights_only=True)``) and so it names what it holds:

    state/step-000123/adapter.safetensors   LoRA parameters (``unet::<module>.lora_A.default.weight`` ...)
    state/step-000123/trainer.pt            optimizer, LR scheduler, grad scaler, torch RNG states (tensors + numbers)
    state/step-000123/trainer.json          step, losses, learning rates, the settings that must match on resume
    state/latest.json                       {"dir": "step-000123"}, written last
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from pathlib import Path
from typing import Mapping

import torch

from ..errors import TrainingError
from ..finite import all_finite
from ..family import Family
from ..fileio import atomic_path, load_safetensors, save_safetensors_atomic, write_text_atomic
from ..lora.formats import LoraModule
from ..lora.writer import kohya_metadata, save_kohya_lora
from ..names import as_text
from ..progress import report
from .config import TrainConfig
from .networks import network_of

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Settings a resumed run must share with the run it continues, or its result would be a different LoRA.
RESUME_MUST_MATCH = ("network", "rank", "alpha", "conv_rank", "conv_alpha", "use_tucker", "lokr_factor", "decompose_both", "target_modules", "train_text_encoder", "text_encoder_target_modules", "init",
                     "use_rslora", "use_dora", "seed", "batch_size", "gradient_accumulation_steps", "optimizer",
                     "resolution", "enable_buckets", "validation_split")


def base_file_name(base: str) -> str:
    """The base model's file or folder name, as kohya writes ``ss_sd_model_name``: never the user's folders."""
    return str(base).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or str(base)


def lora_metadata(cfg: TrainConfig, family: Family, modules: Mapping[str, LoraModule], *, steps_done: int,
                  num_train_images: int, tag_frequency: dict, dataset_dirs: dict, bucket_info: dict,
                  batches_per_epoch: int, epoch: int) -> dict[str, str]:
    ranks = {m.rank for m in modules.values()}
    alphas = {round(float(m.alpha), 6) for m in modules.values() if m.alpha is not None}
    network = network_of(cfg)
    lora = cfg.network in ("lora", "locon")     # LoHa/LoKr: the dim and alpha the user chose (LyCORIS writes these)
    rank = max(ranks) if ranks and lora else cfg.rank
    alpha = alphas.pop() if len(alphas) == 1 and lora else cfg.alpha
    meta = kohya_metadata(
        family=family, rank=rank, alpha=alpha, title=cfg.resolved_output_name(), resolution=cfg.resolution,
        num_train_images=num_train_images, tag_frequency=tag_frequency, network_module=network.module,
        extra={
            "ss_sd_model_name": base_file_name(cfg.base),
            "ss_network_args": {**network.network_args(cfg), "init": cfg.init, "rslora": cfg.use_rslora, "dora": cfg.use_dora,
                                "unet_targets": cfg.target_modules,
                                "text_encoder_targets": cfg.text_encoder_target_modules if cfg.train_text_encoder else []},
            "ss_network_train_unet_only": str(not cfg.train_text_encoder),
            "ss_steps": str(steps_done),
            "ss_max_train_steps": str(cfg.steps),
            "ss_epoch": str(epoch),
            "ss_num_batches_per_epoch": str(batches_per_epoch),
            "ss_batch_size_per_device": str(cfg.batch_size),
            "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
            "ss_learning_rate": str(cfg.learning_rate),
            "ss_unet_lr": str(cfg.learning_rate),
            "ss_text_encoder_lr": str(cfg.text_encoder_lr if cfg.train_text_encoder else 0.0),
            "ss_lr_scheduler": cfg.lr_scheduler,
            "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
            "ss_optimizer": cfg.optimizer,
            "ss_mixed_precision": cfg.mixed_precision,
            "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
            "ss_min_snr_gamma": str(cfg.min_snr_gamma),
            "ss_noise_offset": str(cfg.noise_offset),
            "ss_seed": str(cfg.seed),
            "ss_caption_dropout_rate": str(cfg.caption_dropout_rate),
            "ss_shuffle_caption": str(cfg.shuffle_tags),
            "ss_keep_tokens": str(cfg.keep_tokens),
            "ss_network_dropout": str(cfg.lora_dropout),
            "ss_enable_bucket": str(cfg.enable_buckets),
            "ss_bucket_info": bucket_info,
            "ss_dataset_dirs": dataset_dirs,
            "ss_training_finished_at": str(time.time()),
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
        })
    if cfg.trigger_word:
        meta["modelspec.trigger_phrase"] = cfg.trigger_word
    # safetensors metadata must be valid Unicode: a base path with a name that is not UTF-8 is shown decoded
    return {k: as_text(v) for k, v in meta.items()}


def write_lora(modules: Mapping[str, LoraModule], path: Path, metadata: Mapping[str, str], save_precision: str) -> Path:
    """Write the kohya file (atomically), refusing non-finite weights."""
    for name, mod in modules.items():
        for suffix, t in mod.tensors.items():
            if not all_finite(t):
                raise TrainingError(f"{name}.{suffix} holds NaN/inf values; not writing {path}. "
                                    "Lower the learning rate or use mixed_precision 'no' / 'bf16'.")
    save_kohya_lora(modules, path, metadata, dtype=SAVE_DTYPES[save_precision], hashes=True)
    return path


def write_losses(run_dir: Path, losses: list[float], lrs: list[float]) -> None:
    """``loss.csv`` (step, loss, lr) and ``loss.png`` (raw and smoothed), both written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "loss", "lr"])
    for i, (loss, lr) in enumerate(zip(losses, lrs), start=1):
        w.writerow([i, f"{loss:.6g}", f"{lr:.6g}"])
    write_text_atomic(run_dir / "loss.csv", buf.getvalue())
    if losses:
        plot_losses(losses, run_dir / "loss.png")


def plot_losses(losses: list[float], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # the object API: no pyplot global state, no display needed

    fig = Figure(figsize=(6, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, color="#9bb7d4", linewidth=0.8, label="loss")
    k = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
    ax.plot(steps, smooth, color="#1f4e79", linewidth=1.6, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


# ---------------------------------------------------------------------------------------------- training state
def save_state(state_root: Path, step: int, adapter: Mapping[str, torch.Tensor], torch_state: dict,
               info: dict, keep: int = 1) -> Path:
    """Write one state folder completely, then point ``latest.json`` at it and drop older ones."""
    name = f"step-{step:06d}"
    final = state_root / name
    tmp = state_root / f".{name}.part"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        save_safetensors_atomic(adapter, tmp / "adapter.safetensors")
        with atomic_path(tmp / "trainer.pt") as p:
            torch.save(torch_state, p)
        write_text_atomic(tmp / "trainer.json", json.dumps(info, indent=1))
    except BaseException as err:  # leave no half-written state folder behind, whatever stopped the write
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise TrainingError(f"cannot write training state into {state_root}: {err.strerror or err}. "
                                "Choose an output folder you can write to (is a file named 'state' in the "
                                "way?).") from err
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    write_text_atomic(state_root / "latest.json", json.dumps({"dir": name, "step": step}))
    older = sorted(p for p in state_root.glob("step-*") if p.is_dir() and p.name != name)
    for p in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def find_state(resume: bool | str, run_dir: Path) -> Path:
    """The state folder to resume from: ``True`` -> the run's latest; a path -> that state, or that run's latest."""
    where = run_dir if resume is True else Path(str(resume))
    for candidate in (where, where / "state"):
        latest = candidate / "latest.json"
        if latest.is_file():
            try:
                return candidate / str(json.loads(latest.read_text(encoding="utf-8"))["dir"])
            except (ValueError, KeyError, TypeError) as err:  # bad UTF-8 or JSON is a ValueError
                raise TrainingError(f"{latest} is damaged ({err!r}). Resume from one of its state folders "
                                    f"(--resume {candidate}/step-NNNNNN), or start without --resume.") from err
    if (where / "trainer.json").is_file():
        return where
    raise TrainingError(f"nothing to resume in {where}: no saved training state (state/latest.json) was found. "
                        "Set save_state_every_n_steps, or stop a run with the stop button/Ctrl-C, to save one; "
                        "or start without --resume.")


def load_state(state_dir: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    adapter, _ = load_safetensors(state_dir / "adapter.safetensors")
    try:
        torch_state = torch.load(state_dir / "trainer.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        raise TrainingError(f"training state {state_dir} is damaged ({err}). Resume from another state folder.") from err
    try:
        info = json.loads((state_dir / "trainer.json").read_text(encoding="utf-8"))
        info["step"], info["losses"], info["lrs"] = int(info["step"]), list(info["losses"]), list(info["lrs"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TrainingError(f"training state {state_dir} is damaged (trainer.json: {err!r}). "
                            "Resume from another state folder.") from err
    return adapter, torch_state, info


def check_resumable(cfg: TrainConfig, saved: dict, state_dir: Path) -> None:
    for key in RESUME_MUST_MATCH:
        if key in saved and saved[key] != getattr(cfg, key):
            raise TrainingError(f"cannot resume from {state_dir}: it was trained with {key} = {saved[key]!r}, "
                                f"but this run has {key} = {getattr(cfg, key)!r}. Use the same setting, or start "
                                "a new run without --resume.")


def resume_run(cfg: TrainConfig, run_dir: Path, named: dict[str, torch.nn.Parameter], optimizer, lr_scheduler,
            accelerator, progress) -> tuple[int, list[float], list[float], dict]:
    """Load a saved state (``save_state``) into the freshly built run: LoRA weights, optimizer, LR scheduler,
    loss scaler and RNG states. Returns (step, losses, learning rates) so far and trainer.json's contents."""
    state_dir = find_state(cfg.resume, run_dir)
    adapter, torch_state, info = load_state(state_dir)
    check_resumable(cfg, info.get("config", {}), state_dir)
    missing = sorted(set(named) - set(adapter))
    if missing:
        raise TrainingError(f"state {state_dir} lacks LoRA weights for {missing[:3]}; it belongs to another run. "
                            "Resume from this run's own state folder, or start without --resume.")
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(adapter[k].to(p.device, p.dtype))
    optimizer.load_state_dict(torch_state["optimizer"])
    lr_scheduler.load_state_dict(torch_state["lr_scheduler"])
    if accelerator.scaler is not None and torch_state.get("scaler"):
        accelerator.scaler.load_state_dict(torch_state["scaler"])
    torch.set_rng_state(torch_state["rng_cpu"])
    if torch.cuda.is_available() and torch_state.get("rng_cuda"):
        torch.cuda.set_rng_state_all(torch_state["rng_cuda"])
    step = int(info["step"])
    report(progress, "train", step, cfg.steps, f"resumed from {state_dir} at step {step}")
    return step, list(info["losses"]), list(info["lrs"]), info
