"""Merged checkpoints: fuse LoRAs at strengths into a base model and write a single file or a diffusers folder.

The single file uses the original (ldm) layout that AUTOMATIC1111 and ComfyUI load and diffusers'
``from_single_file`` reads back. The merge runs in fp32 (``W = W0 + sum(strength * delta)``, each delta from
``lora.math.module_delta`` against the unmerged W0, as AUTOMATIC1111 does), then the whole model is converted to
the output dtype *in place*, module by module, so the peak stays near one fp32 copy of the model; every tensor
is checked with ``isfinite`` after conversion (fp16 overflow shows up there) before anything is written.

A single-file ``.safetensors`` or diffusers-folder base exported to a single file takes the streamed path instead
(``export_stream``): same arithmetic, same bytes, but one tensor at a time, so the peak is a fraction of the
checkpoint's size rather than a whole fp32 model plus the file.

LoRA-file operations (merge several LoRAs into one, resize, extract) live in ``export_lora`` and are re-exported
here.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConfigError, InputFileError, StopRequested
from .finite import refuse_nonfinite
from .export_lora import ResizeReport, extract_lora, file_sha256, merge_loras, parse_dtype, resize_lora
from .family import Family, family_of_pipeline
from .fileio import atomic_dir, read_safetensors_header, save_safetensors_atomic
from .progress import ProgressCallback, StopFlag, report

__all__ = ["ExportResult", "ResizeReport", "export_merged_checkpoint", "merge_into_pipeline", "merge_loras",
           "resize_lora", "extract_lora", "parse_lora_arg", "checkpoint_metadata"]

FORMATS = ("single_file", "diffusers")
DEFAULT_RESOLUTION = {Family.SD1: 512, Family.SD2: 768, Family.SDXL: 1024}
MERGE_INFO_FILE = "lora_studio_merge.json"  # what a diffusers-folder export records (its files have no header)


@dataclass
class ExportResult:
    out: Path
    fmt: str
    dtype: str
    family: Family
    merged: list[dict] = field(default_factory=list)    # name, strength, sha256, modules per LoRA
    modules_changed: int = 0
    seconds: float = 0.0
    bytes: int = 0

    def text(self) -> str:
        loras = ", ".join(f"{m['name']}:{m['strength']:g}" for m in self.merged) or "no LoRAs"
        return (f"wrote {self.out} ({self.fmt}, {self.dtype}, {self.family.label}, {self.bytes / 2**20:.1f} MiB) "
                f"in {self.seconds:.1f}s: merged {loras} into {self.modules_changed} layers")


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``"a.safetensors:0.8"`` -> ``("a.safetensors", 0.8)``; no ``:number`` suffix means strength 1."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass  # a colon that is part of the path (C:\...)
    return text, 1.0


# --------------------------------------------------------------------------- merging into a pipeline
def _load_base(base, config_dir, progress):
    """``(pipe, family, source_path or None)``; a path is loaded with ``models.load_pipeline`` in fp32."""
    if isinstance(base, (str, os.PathLike)):
        from .models import load_pipeline  # another engineer's loader; imported late on purpose

        report(progress, "load", 0, 1, str(base))
        kwargs = {"config_dir": config_dir} if config_dir is not None else {}
        loaded = load_pipeline(str(base), **kwargs)
        report(progress, "load", 1, 1, str(base))
        pipe = loaded.pipe
        return pipe, getattr(loaded, "family", None) or family_of_pipeline(pipe), Path(base)
    pipe = getattr(base, "pipe", base)  # a LoadedModel or a bare pipeline
    return pipe, getattr(base, "family", None) or family_of_pipeline(pipe), None


def _mixer_on(pipe, loras):
    """A ``LoraMixer`` on ``pipe`` holding ``loras``: (path, strength) pairs, or another mixer's entries (same
    LoRA files, strengths, text-encoder strengths and block weights; the files are not read again)."""
    from .mix import LoraMixer

    mixer = LoraMixer(pipe)
    if isinstance(loras, LoraMixer):
        for e in loras.entries:
            mixer.add(e.lora, name=e.name, strength=e.strength, te_strength=e.te_strength,
                      block_weights=dict(e.block_weights))
    else:
        for path, strength in loras:
            mixer.add(path, strength=float(strength))
    return mixer


def _records(mixer) -> list[dict]:
    out = []
    for e in mixer.entries:
        rec = {"name": e.path.name if e.path else e.name, "strength": e.strength,
               "sha256": file_sha256(e.path) if e.path and e.path.is_file() else None, "modules": e.matched}
        if e.te_strength is not None:
            rec["te_strength"] = e.te_strength
        if e.block_weights:
            rec["block_weights"] = e.block_weights
        out.append(rec)
    return out


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
    from .lora.keys import pipeline_components
    from .lora.math import module_delta

    mixer = _mixer_on(pipe, loras)
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
    return _records(mixer), len(plan)


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


OVERFLOW_REMEDY = "Lower the LoRA strengths, or export in fp32/bf16 if fp16 overflowed"


def _check_finite(tensors, where: str) -> None:
    refuse_nonfinite(tensors, where, OVERFLOW_REMEDY)


def _base_metadata(source: Path | None) -> dict[str, str]:
    if source is None or source.suffix.lower() != ".safetensors" or not source.is_file():
        return {}

    return read_safetensors_header(source)[1]


def checkpoint_metadata(base_meta: dict[str, str], family: Family, title: str, records: list[dict],
                        dtype: str, base_name: str) -> dict[str, str]:
    """Base metadata + what was merged + model-spec keys for a merged checkpoint."""
    res = DEFAULT_RESOLUTION[family]
    meta = {k: v for k, v in base_meta.items() if k != "modelspec.hash_sha256"}
    meta.update({
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture.removesuffix("/lora"),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if family is Family.SDXL else "https://github.com/Stability-AI/stablediffusion",
        "modelspec.title": title,
        "modelspec.resolution": meta.get("modelspec.resolution", f"{res}x{res}"),
        "modelspec.date": time.strftime("%Y-%m-%d"),
        "lora_studio.base_model": base_name,
        "lora_studio.merged_loras": json.dumps(records),
        "lora_studio.dtype": dtype,
    })
    return meta


def export_merged_checkpoint(base, loras, out: str | os.PathLike, *,
                             fmt: str = "single_file", dtype: str = "fp16", config_dir: str | None = None,
                             progress: ProgressCallback | None = None, stop: StopFlag | None = None) -> ExportResult:
    """Fuse ``loras`` into ``base`` and write ``out``.

    ``base`` is a model path or "demo" (a single-file ``.safetensors`` or a diffusers folder written to a single
    file is streamed tensor by tensor, ``export_stream``; anything else is loaded here with ``models.load_pipeline`` in fp32, then
    consumed: merged and converted in place, which keeps the peak near one copy of the model) or an already loaded pipeline /
    ``LoadedModel`` (left as it was: the merged layers are restored after writing, and the dtype conversion
    copies tensor by tensor). ``loras`` is a list of (path, strength) or a ``LoraMixer`` (the UI's live mix: its
    strengths, text-encoder strengths and block weights are used); ``base=None`` with a mixer means the mixer's
    own pipeline, whose mix is applied again afterwards. ``fmt`` is "single_file" (one ldm-layout
    ``.safetensors``) or "diffusers" (a ``save_pretrained`` folder, which needs a base path). Writes are atomic:
    a failure or a ``stop`` request leaves no file under ``out`` and an earlier file there untouched.
    """
    from .ldm import pipeline_to_ldm_state_dict

    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is unknown; use 'single_file' or 'diffusers'.")
    torch_dtype = parse_dtype(dtype)
    out = Path(out)
    if fmt == "single_file" and out.suffix.lower() != ".safetensors":
        raise ConfigError(f"--out {out} should end in .safetensors for a single-file export "
                          "(or pass --format diffusers to write a folder).")
    if isinstance(base, (str, os.PathLike)) and Path(base).resolve() == out.resolve():
        raise ConfigError(f"--out {out} is the base model itself; choose another name so the base stays intact.")
    from .mix import LoraMixer

    live = loras if isinstance(loras, LoraMixer) else None
    if live is None:
        for path, _ in loras:
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
        from .export_stream import NotStreamable, stream_folder_checkpoint, stream_merged_checkpoint

        path = Path(base)
        try:  # the low-memory paths (see export_stream)
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
            meta = checkpoint_metadata(_base_metadata(source), family, out.stem, records, dtype, base_name)
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
