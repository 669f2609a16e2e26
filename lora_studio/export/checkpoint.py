"""Merged checkpoints: fuse LoRAs at strengths into a base model and write a single file or a diffusers folder.

The single file uses the original (ldm) layout that AUTOMATIC1111 and ComfyUI load and diffusers'
``from_single_file`` reads back. The merge runs in fp32 (``W = W0 + sum(strength * delta)``, each delta from
``lora.math.module_delta`` against the unmerged W0, as AUTOMATIC1111 does), then the whole model is converted to
the output dtype *in place*, module by module, so the peak stays near one fp32 copy of the model; every tensor
is checked with ``isfinite`` after conversion (fp16 overflow shows up there) before anything is written.

A single-file ``.safetensors`` or diffusers-folder base exported to a single file takes the streamed path instead
(``stream``): same arithmetic, same bytes, but one tensor at a time, so the peak is a fraction of the
checkpoint's size rather than a whole fp32 model plus the file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..configs.carried import configs_of_pipeline
from ..errors import ConfigError, InputFileError, StopRequested
from ..fileio import atomic_dir, save_safetensors_atomic
from ..finite import refuse_nonfinite
from ..ldm import pipeline_to_ldm_state_dict
from ..lora.keys import pipeline_components
from ..lora.math import module_delta
from ..mix import LoraMixer
from ..models import load_base
from ..progress import ProgressCallback, StopFlag, report
from .lora_ops import parse_dtype
from .plan import (FORMATS, MERGE_INFO_FILE, OVERFLOW_REMEDY, ExportResult, base_metadata, checkpoint_metadata,
                   merge_records, mixer_on)
from .stream import NotStreamable, stream_folder_checkpoint, stream_merged_checkpoint


# --------------------------------------------------------------------------- merging into a pipeline
def _load_base(base, config_dir, progress):
    """``(pipe, family, source path or None)``: a path is loaded in fp32 (and then consumed by the export); a model
    handed over is used as it is."""
    loaded = load_base(base, config_dir=config_dir, progress=progress)
    return loaded.pipe, loaded.family, Path(base) if isinstance(base, (str, os.PathLike)) else None


def merge_into_pipeline(pipe, loras, progress: ProgressCallback | None = None,
                        backup: dict | None = None, stop: StopFlag | None = None) -> tuple[list[dict], int]:
    """Fuse LoRAs into ``pipe``'s weights in place: ``W = W0 + sum(coefficient * delta)`` in fp32, the result
    cast to each weight's dtype. ``loras`` is a list of (path, strength) or a ``LoraMixer`` whose entries to use.

    The coefficients come from ``LoraMixer`` (strength, text-encoder strength, block weights), so the file
    equals the live mix; the fusing is done here, without the mixer's copy of every original weight, to keep
    peak memory near one model. Every module must land on a layer, or ``LoraFormatError`` lists those that do
    not before anything changes. If ``backup`` is a dict, each changed weight's original is stored there
    (weight tensor -> copy) so ``restore_weights`` can undo the merge. Returns (records, layers changed).
    """
    mixer = mixer_on(pipe, loras)
    comps = pipeline_components(pipe)
    plan = mixer.contributions()
    with torch.no_grad():
        for i, ((comp, mname), items) in enumerate(sorted(plan.items()), 1):
            if stop is not None and stop.requested:
                break  # the caller checks the flag and restores or drops the pipeline
            weight = comps[comp].get_submodule(mname).weight
            if backup is not None:
                backup[weight] = weight.detach().clone()
            w0 = weight.detach().to(torch.float32)
            total = w0.clone()
            for coeff, mod in items:
                if coeff != 0.0:
                    total.add_(module_delta(mod, tuple(w0.shape), base=w0), alpha=coeff)
            weight.copy_(total.to(weight.dtype))
            report(progress, "merge", i, len(plan), mname)
    return merge_records(mixer), len(plan)


def restore_weights(backup: dict) -> None:
    with torch.no_grad():
        for weight, original in backup.items():
            weight.copy_(original)
    backup.clear()


# --------------------------------------------------------------------------- writing
def _convert_in_place(pipe, dtype: torch.dtype, progress) -> None:
    """Cast every model of the pipeline to ``dtype`` parameter by parameter (``Module.to`` replaces each tensor
    in turn, so the old one is freed before the next is made)."""
    models = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    for i, m in enumerate(models, 1):
        m.to(dtype)
        report(progress, "convert", i, len(models), type(m).__name__)


def _check_stop(stop: StopFlag | None, out: Path) -> None:
    if stop is not None and stop.requested:
        raise StopRequested(f"export to {out} stopped on request; nothing was written.")


def _check_finite(tensors, where: str) -> None:
    refuse_nonfinite(tensors, where, OVERFLOW_REMEDY)


def export_merged_checkpoint(base, loras, out: str | os.PathLike, *,
                             fmt: str = "single_file", dtype: str = "fp16", config_dir: str | None = None,
                             progress: ProgressCallback | None = None, stop: StopFlag | None = None) -> ExportResult:
    """Fuse ``loras`` into ``base`` and write ``out``.

    ``base`` is a model path or "demo" (a single-file ``.safetensors`` or a diffusers folder written to a single
    file is streamed tensor by tensor, ``stream``; anything else is loaded here with ``models.load_base`` in fp32, then
    consumed: merged and converted in place, which keeps the peak near one copy of the model) or an already loaded pipeline /
    ``LoadedModel`` (left as it was: the merged layers are restored after writing, and the dtype conversion
    copies tensor by tensor). ``loras`` is a list of (path, strength) or a ``LoraMixer`` (the UI's live mix: its
    strengths, text-encoder strengths and block weights are used); ``base=None`` with a mixer means the mixer's
    own pipeline, whose mix is applied again afterwards. ``fmt`` is "single_file" (one ldm-layout
    ``.safetensors``) or "diffusers" (a ``save_pretrained`` folder, which needs a base path). Writes are atomic:
    a failure or a ``stop`` request leaves no file under ``out`` and an earlier file there untouched.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is unknown; use 'single_file' or 'diffusers'.")
    torch_dtype = parse_dtype(dtype)
    out = Path(out)
    if fmt == "single_file" and out.suffix.lower() != ".safetensors":
        raise ConfigError(f"--out {out} should end in .safetensors for a single-file export "
                          "(or pass --format diffusers to write a folder).")
    if isinstance(base, (str, os.PathLike)) and Path(base).resolve() == out.resolve():
        raise ConfigError(f"--out {out} is the base model itself; choose another name so the base stays intact.")
    live = loras if isinstance(loras, LoraMixer) else None
    if live is None:
        for path, *_ in loras:
            if not Path(path).is_file():
                raise InputFileError(f"LoRA file {path} does not exist. Check the path.")
    if base is None:
        if live is None:
            raise ConfigError("export needs a base model: pass its path (or a loaded pipeline).")
        base = live.pipe
    if fmt == "diffusers" and not isinstance(base, (str, os.PathLike)):
        raise ConfigError("a diffusers-folder export needs the base model's path (the model is loaded afresh and "
                          "converted in place); pass the path instead of a loaded pipeline.")
    if fmt == "single_file" and isinstance(base, (str, os.PathLike)):
        path = Path(base)
        try:  # the low-memory paths (see stream)
            if path.suffix.lower() == ".safetensors" and path.is_file():
                return stream_merged_checkpoint(path, loras, out, torch_dtype, dtype, config_dir, progress, stop)
            if path.is_dir() and (path / "model_index.json").is_file():
                return stream_folder_checkpoint(path, loras, out, torch_dtype, dtype, progress, stop)
        except NotStreamable as why:  # raised before anything is written: load the model instead
            report(progress, "load", 0, 1, f"cannot stream this export ({why}); loading the whole model")
    t0 = time.monotonic()
    pipe, family, source = _load_base(base, config_dir, progress)
    owned = source is not None
    reapply = live is not None and pipe is live.pipe
    if reapply:
        live.restore()  # the merge starts from W0; the live mix is applied again afterwards
    backup = None if owned else {}  # the caller's pipeline gets its weights back (only merged layers are copied)
    try:
        records, changed = merge_into_pipeline(pipe, loras, progress, backup, stop)
        _check_stop(stop, out)
        base_name = source.name if source is not None else "(loaded pipeline)"
        if fmt == "single_file":
            if owned:
                _convert_in_place(pipe, torch_dtype, progress)
                sd = pipeline_to_ldm_state_dict(pipe, family)
            else:
                sd = {k: v.detach().to(torch_dtype) if v.is_floating_point() else v
                      for k, v in pipeline_to_ldm_state_dict(pipe, family).items()}
            _check_finite(sd.items(), str(out))
            _check_stop(stop, out)
            meta = checkpoint_metadata(base_metadata(source), family, out.stem, records, dtype, base_name,
                                       pipe.scheduler.config.get("prediction_type", "epsilon"),
                                       configs_of_pipeline(pipe))
            report(progress, "write", 0, 1, str(out))
            save_safetensors_atomic(sd, out, meta)
            del sd
            size = out.stat().st_size
        else:
            _convert_in_place(pipe, torch_dtype, progress)
            _check_finite(((f"{c}.{n}", p) for c, m in pipe.components.items() if isinstance(m, torch.nn.Module)
                           for n, p in m.state_dict().items()), str(out))
            _check_stop(stop, out)
            report(progress, "write", 0, 1, str(out))
            size = _save_folder(pipe, out, {"base_model": base_name, "dtype": dtype, "family": family.value,
                                            "merged_loras": records})
        report(progress, "write", 1, 1, str(out))
    finally:
        if backup is not None:
            restore_weights(backup)
        if reapply:
            live.apply()
    return ExportResult(out, fmt, dtype, family, records, changed, time.monotonic() - t0, size)


def _save_folder(pipe, out: Path, info: dict) -> int:
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / MERGE_INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
        return sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
