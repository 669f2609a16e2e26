"""Merged single-file export that streams: read one tensor, merge, convert, write it; never the whole model.

(The same for a diffusers-folder base, ``stream_folder_checkpoint`` at the end: its component files are renamed
into the single-file layout tensor by tensor.)

For a single-file ``.safetensors`` base written to a single file (the common case: a Civitai checkpoint plus
LoRAs, out as one file for AUTOMATIC1111 or ComfyUI) nothing needs the model as a whole. The LoRAs are matched
on an empty *skeleton* of the model (its modules built from the config files on torch's ``meta`` device: names
and shapes, no weights), each target weight is located in the file (``ldm.locate``), and then the checkpoint is
copied tensor by tensor: read with ``readinto`` (no memory map, so the file's pages do not count as ours), the
LoRA deltas added in fp32 where the tensor is a target, cast to the output dtype, checked finite, and written
by ``fileio.write_safetensors_streamed``. Peak memory is the libraries plus the largest tensor or two (the
token embedding, ~150 MB in fp32 for SD 1.5), instead of the checkpoint plus a whole fp32 model as with loading
through diffusers (bench/export.py measures both).

The arithmetic is the same as ``checkpoint.merge_into_pipeline`` (``W0`` in fp32, plus ``coefficient * delta`` per
LoRA, cast once), so the merged tensors are bit-identical to the in-memory export (a test checks it). What is
copied: every tensor of the base file except the EMA copy of the UNet (``model_ema.*``, which loaders ignore and
would stay unmerged); tensors keep their names, integer tensors their dtype.

Written by hand: neither diffusers nor safetensors merges or writes tensor by tensor.
"""

from __future__ import annotations

import importlib
import math
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ..configs.carried import configs_of_folder, single_file_configs
from ..errors import InputFileError, StopRequested
from ..family import Family, family_of_pipeline
from ..fileio import TORCH_DTYPES, read_safetensors_header, read_safetensors_tensor, write_safetensors_streamed
from ..finite import refuse_nonfinite
from ..ldm import SD2_FULL_TEXT_LAYERS, detect_family_from_ldm_keys, pipeline_to_ldm_state_dict
from ..ldm.locate import LdmLocation, ldm_location
from ..ldm.text import OPENCLIP_LOGIT_SCALE
from ..lora.math import module_delta
from ..models import check_config_dir, scheduler_prediction_type
from ..progress import ProgressCallback, StopFlag, report
from .plan import OVERFLOW_REMEDY, ExportResult, checkpoint_metadata, merge_records, mixer_on

DROPPED_PREFIXES = ("model_ema.",)


class NotStreamable(Exception):
    """This export cannot be streamed (a LoRA target with no plain place in the file, a dtype the reader does
    not know); raised before anything is written, so the caller takes the in-memory path instead."""
SYNTHESISED = ("position_ids", "logit_scale")  # written by our layout when missing; a base file may lack them
SKELETON_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _model_class(index: dict, name: str):
    entry = index.get(name)
    if not entry or entry[0] is None:
        return None
    library, cls = entry
    return getattr(importlib.import_module(library), cls)


def skeleton_pipeline(config_dir: Path) -> SimpleNamespace:
    """The models of a pipeline built from ``config_dir``'s configs on the meta device (no memory for weights):
    enough to match LoRA names and check shapes, with the attributes ``pipeline_components`` and
    ``family_of_pipeline`` read."""
    index = json.loads((config_dir / "model_index.json").read_text(encoding="utf-8"))
    parts: dict[str, object] = {}
    with torch.device("meta"):
        for name in SKELETON_PARTS:
            cls = _model_class(index, name)
            if cls is None:
                parts[name] = None
                continue
            folder = config_dir / name
            if hasattr(cls, "load_config"):  # diffusers models
                parts[name] = cls.from_config(cls.load_config(folder))
            else:  # transformers models
                config_cls = cls.config_class
                parts[name] = cls(config_cls.from_pretrained(folder))
    return SimpleNamespace(**parts)


def _check_skeleton(header: dict, skeleton, family: Family, source: str, config_dir: Path) -> None:
    """Every tensor the configs describe must be in the file with the same shape; else the configs do not fit."""
    expected = pipeline_to_ldm_state_dict(skeleton, family, pad_sd2_text_encoder=False)
    missing = [k for k in expected if k not in header and not k.endswith(SYNTHESISED)]
    wrong = [f"{k}: file {header[k]['shape']} vs config {list(t.shape)}" for k, t in expected.items()
             if k in header and list(header[k]["shape"]) != list(t.shape)
             and not (k.endswith("text_projection") and list(header[k]["shape"]) == list(t.shape)[::-1])]
    if wrong:
        raise InputFileError(f"{source} does not fit the {family.label} configs in {config_dir}: "
                             f"{len(wrong)} tensor(s) differ in shape, e.g. {'; '.join(wrong[:3])}. If it is a "
                             "non-standard model, pass a config folder that matches it (config_dir / --config-dir).")
    if missing:
        raise InputFileError(f"{source} lacks {len(missing)} tensor(s) a {family.label} checkpoint has, e.g. "
                             f"{', '.join(missing[:3])}. It is incomplete: use a full checkpoint.")


def _targets(plan: dict, skeleton, family: Family) -> dict[str, list[tuple[int | None, tuple, list]]]:
    """checkpoint key -> [(q/k/v part or None, the module weight's shape, [(coefficient, LoraModule)])]."""
    out: dict[str, list] = {}
    bad = []
    vae_up = len(skeleton.vae.decoder.up_blocks) if getattr(skeleton, "vae", None) is not None else None
    for (comp, mname), items in sorted(plan.items()):
        loc: LdmLocation | None = ldm_location(family, comp, mname + ".weight", skeleton.unet.config, vae_up)
        if loc is None:
            bad.append(f"{comp}.{mname}")
            continue
        shape = tuple(getattr(skeleton, comp).get_submodule(mname).weight.shape)
        out.setdefault(loc.key, []).append((loc.part, shape, items))
    if bad:
        raise NotStreamable(f"{len(bad)} LoRA target(s) have no plain place in the single-file layout: "
                            f"{', '.join(bad[:5])}")
    return out


def _merged(tensor: torch.Tensor, parts: list, key: str) -> torch.Tensor:
    """``tensor`` (as read) with the LoRA deltas added in fp32; DoRA deltas see the unmerged W0."""

    w0 = tensor.to(torch.float32)
    total = w0.clone()
    for part, shape, items in parts:
        if part is None:
            base, into = w0.reshape(shape), total.reshape(shape)
        else:
            rows = shape[0]
            if w0.shape[0] != 3 * rows:
                raise InputFileError(f"{key} has {w0.shape[0]} rows; a fused q/k/v projection of {rows}-row "
                                     "weights has three times that. The checkpoint does not fit its configs.")
            base, into = w0[part * rows:(part + 1) * rows], total[part * rows:(part + 1) * rows]
        for coeff, mod in items:
            if coeff != 0.0:
                into.add_(module_delta(mod, shape, base=base), alpha=coeff)
    return total


def _out_dtype(stored: torch.dtype, want: torch.dtype) -> torch.dtype:
    return want if stored.is_floating_point else stored


def _layout(stored: dict[str, torch.dtype], shapes: dict[str, tuple], want: torch.dtype) -> list[tuple]:
    """(name, output dtype, shape) of every output tensor, in the safetensors library's own order: wider dtypes
    first (keeps every tensor aligned), then by name."""
    return sorted(((k, _out_dtype(d, want), shapes[k]) for k, d in stored.items()), key=lambda e: (-e[1].itemsize, e[0]))


def _prediction_type(config_dir: Path, base_meta: dict) -> str:
    """The base's prediction type as ``models.load_base`` would set it: the one the file declares, else its
    config's scheduler's (diffusers' default: epsilon)."""
    sched = config_dir / "scheduler" / "scheduler_config.json"
    config = json.loads(sched.read_text(encoding="utf-8")) if sched.is_file() else {}
    return scheduler_prediction_type(base_meta.get("modelspec.prediction_type")) or \
        config.get("prediction_type", "epsilon")


def _merge_plan(skeleton, family: Family, loras, base_meta: dict, out: Path, dtype_name: str, base_name: str,
                prediction_type: str | None = None, configs: dict[str, str] | None = None):
    """The LoRAs matched on the skeleton: (layers changed, checkpoint key -> targets, records, file metadata)."""

    mixer = mixer_on(skeleton, loras)
    plan = mixer.contributions()
    records = merge_records(mixer)
    meta = checkpoint_metadata(base_meta, family, out.stem, records, dtype_name, base_name, prediction_type,
                               configs)
    return len(plan), _targets(plan, skeleton, family), records, meta


def _finished(layout, read, targets: dict, out: Path, progress: ProgressCallback | None, stop: StopFlag | None):
    """The output tensors in ``layout`` order: ``read(key, shape)``, the LoRA deltas added where ``targets`` says,
    cast to the output dtype, checked finite (fp16 overflow), with progress and the stop request checked."""
    for i, (key, dtype, shape) in enumerate(layout, 1):
        if stop is not None and stop.requested:
            raise StopRequested(f"export to {out} stopped on request; nothing was written.")
        t = read(key, shape)
        if key in targets:
            t = _merged(t, targets[key], key)
        cast = t.to(dtype)
        refuse_nonfinite([(key, cast)], str(out), OVERFLOW_REMEDY, {key: t})
        t = cast
        report(progress, "write", i, len(layout), key)
        yield t


def stream_merged_checkpoint(base: Path, loras, out: Path, torch_dtype: torch.dtype, dtype_name: str,
                             config_dir: Path | None, progress: ProgressCallback | None = None,
                             stop: StopFlag | None = None):
    """Fuse ``loras`` ((path, strength) pairs or a ``LoraMixer``) into the single-file checkpoint ``base`` and
    write ``out`` tensor by tensor (see the module docstring). Returns a ``plan.ExportResult``; raises
    ``NotStreamable`` (before writing anything) when the export needs the in-memory path."""

    t0 = time.monotonic()
    report(progress, "load", 0, 1, str(base))
    header, base_meta = read_safetensors_header(base)
    family = detect_family_from_ldm_keys(header, str(base))
    given = check_config_dir(Path(config_dir), family) if config_dir else None
    with single_file_configs(family, base_meta, str(base), given, header) as cfg:
        skeleton = skeleton_pipeline(cfg)
        _check_skeleton(header, skeleton, family, str(base), cfg)
        report(progress, "load", 1, 1, str(base))
        n_changed, targets, records, meta = _merge_plan(skeleton, family, loras, base_meta, out, dtype_name,
                                                        base.name, _prediction_type(cfg, base_meta),
                                                        configs_of_folder(cfg))
    keys = [k for k in header if not k.startswith(DROPPED_PREFIXES)]
    stored = {k: TORCH_DTYPES.get(header[k]["dtype"]) for k in keys}
    unreadable = [k for k, d in stored.items() if d is None]
    if unreadable:
        raise NotStreamable(f"{base} holds tensors of dtype {header[unreadable[0]]['dtype']} "
                            f"(e.g. {unreadable[0]})")
    layout = _layout(stored, {k: tuple(header[k]["shape"]) for k in keys}, torch_dtype)

    def produce():
        with open(base, "rb") as fh:
            data_start = 8 + int.from_bytes(fh.read(8), "little")
            yield from _finished(layout, lambda key, shape: read_safetensors_tensor(fh, data_start, header[key]),
                                 targets, out, progress, stop)

    report(progress, "write", 0, len(layout), str(out))
    size = write_safetensors_streamed(out, layout, produce(), meta)
    return ExportResult(out, "single_file", dtype_name, family, records, n_changed, time.monotonic() - t0, size)


# --------------------------------------------------------------------------- a diffusers folder as the base
WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}


def _component_sources(folder: Path, comp: str) -> dict[str, tuple[Path, dict]]:
    """Every tensor of one component's weight file(s): name -> (file, header entry). Reads a single
    ``<name>.safetensors`` or a sharded one (``<name>.safetensors.index.json``); anything else (only ``.bin``
    pickles, only an ``fp16`` variant) is ``NotStreamable``, and loading the folder says what is wrong."""
    base = folder / comp / WEIGHT_NAMES[comp]
    single, index = base.with_suffix(".safetensors"), base.with_name(base.name + ".safetensors.index.json")
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise NotStreamable(f"{index} cannot be read ({err})") from err
        files = [index.parent / f for f in sorted(set(weight_map.values()))]
    else:
        raise NotStreamable(f"{folder / comp} has no {single.name}")
    out: dict[str, tuple[Path, dict]] = {}
    for f in files:
        header, _ = read_safetensors_header(f)
        out.update({k: (f, v) for k, v in header.items()})
    return out


def _folder_recipes(folder: Path, skeleton, family: Family) -> tuple[dict[str, tuple], dict[str, torch.Tensor]]:
    """Single-file key -> how to build it from the folder's tensors: ``("copy", comp, name, shape)``,
    ``("cat", comp, [q, k, v], shape)`` (OpenCLIP's fused projection) or ``("t", comp, name, shape)`` (its
    transposed text_projection); plus the small tensors the folder has no file entry for (CLIP position ids,
    OpenCLIP's logit scale), made as ``pipeline_to_ldm_state_dict`` makes them. Shapes are checked against the
    skeleton's state dict renamed by that same function."""

    expected = pipeline_to_ldm_state_dict(skeleton, family, pad_sd2_text_encoder=False)
    vae_up = len(skeleton.vae.decoder.up_blocks)
    recipes: dict[str, tuple] = {}
    fused: dict[str, list] = {}
    sources: dict[str, dict[str, tuple[Path, dict]]] = {}
    for comp in SKELETON_PARTS:
        if getattr(skeleton, comp, None) is None:
            continue
        sources[comp] = _component_sources(folder, comp)
        for name in sources[comp]:
            loc = ldm_location(family, comp, name, skeleton.unet.config, vae_up)
            if loc is None:
                if name == "text_projection.weight" and comp in ("text_encoder", "text_encoder_2"):
                    key = next((k for k in expected if k.endswith("text_projection")), None)
                    if key is not None:
                        recipes[key] = ("t", comp, name)
                continue  # e.g. an OpenCLIP encoder's position_ids buffer: the layout has no place for it
            if loc.part is None:
                recipes[loc.key] = ("copy", comp, name)
            else:
                fused.setdefault(loc.key, [None, None, None])[loc.part] = name
                recipes[loc.key] = ("cat", comp, fused[loc.key])
    made: dict[str, torch.Tensor] = {}
    for key, t in expected.items():
        if key in recipes:
            continue
        if key.endswith("position_ids") and not t.is_meta:
            made[key] = t
        elif key.endswith("logit_scale"):
            made[key] = torch.tensor(OPENCLIP_LOGIT_SCALE, dtype=torch.float32)
        else:
            raise NotStreamable(f"{folder} has no tensor for {key}")
    extra = sorted(set(recipes) - set(expected))
    if extra or any(r[0] == "cat" and None in r[2] for r in recipes.values()):
        raise NotStreamable(f"{folder} holds tensors with no place in the layout ({', '.join(extra[:3])})")
    out: dict[str, tuple] = {}
    for key, (kind, comp, names) in recipes.items():
        entries = [sources[comp][n] for n in (names if kind == "cat" else [names])]
        rows = sum(e[1]["shape"][0] for e in entries) if kind == "cat" else None
        got = [rows, *entries[0][1]["shape"][1:]] if kind == "cat" else entries[0][1]["shape"][::-1 if kind == "t" else 1]
        want = list(expected[key].shape)
        if math.prod(got) != math.prod(want) or (kind != "copy" and list(got) != want):
            raise InputFileError(f"{folder}: {comp} tensor(s) {names} have shape {got}, but the model's configs give "
                                 f"{want} for {key}. The folder's weights do not fit its configs.")
        out[key] = (kind, entries, tuple(want))
    return out, made


def _assemble(kind: str, entries: list, shape: tuple, handles: dict) -> torch.Tensor:
    def read(entry):
        path, info = entry
        fh = handles[path]
        return read_safetensors_tensor(fh["file"], fh["start"], info)

    if kind == "cat":
        return torch.cat([read(e) for e in entries], dim=0)
    t = read(entries[0])
    return t.T.contiguous() if kind == "t" else t.reshape(shape)


def stream_folder_checkpoint(folder: Path, loras, out: Path, torch_dtype: torch.dtype, dtype_name: str,
                             progress: ProgressCallback | None = None, stop: StopFlag | None = None):
    """Like ``stream_merged_checkpoint`` for a diffusers folder base: its component files are renamed into the
    single-file layout tensor by tensor (what ``pipeline_to_ldm_state_dict`` does to a loaded pipeline) and merged
    on the way. SD 2's cut-down text encoder (which the layout pads with an identity block) and folders in other
    shapes raise ``NotStreamable``."""

    t0 = time.monotonic()
    report(progress, "load", 0, 1, str(folder))
    skeleton = skeleton_pipeline(folder)
    family = family_of_pipeline(skeleton)
    te = skeleton.text_encoder
    if family is Family.SD2 and int(te.config.num_hidden_layers) == SD2_FULL_TEXT_LAYERS - 1:
        raise NotStreamable("SD 2's text encoder is written with an added identity block")
    recipes, made = _folder_recipes(folder, skeleton, family)
    report(progress, "load", 1, 1, str(folder))

    n_changed, targets, records, meta = _merge_plan(skeleton, family, loras, {}, out, dtype_name, folder.name,
                                                    _prediction_type(folder, {}), configs_of_folder(folder))
    stored = {k: TORCH_DTYPES.get(e[1][0][1]["dtype"]) for k, e in recipes.items()}
    stored.update({k: t.dtype for k, t in made.items()})
    if any(d is None for d in stored.values()):
        raise NotStreamable(f"{folder} holds tensors of a dtype the stream does not read")
    shapes = {**{k: r[2] for k, r in recipes.items()}, **{k: tuple(t.shape) for k, t in made.items()}}
    layout = _layout(stored, shapes, torch_dtype)

    def produce():
        files = sorted({e[0] for r in recipes.values() for e in r[1]})
        handles = {}
        try:
            for f in files:
                fh = open(f, "rb")
                handles[f] = {"file": fh, "start": 8 + int.from_bytes(fh.read(8), "little")}
            yield from _finished(layout, lambda key, shape: made[key] if key in made else
                                 _assemble(recipes[key][0], recipes[key][1], shape, handles),
                                 targets, out, progress, stop)
        finally:
            for h in handles.values():
                h["file"].close()

    report(progress, "write", 0, len(layout), str(out))
    size = write_safetensors_streamed(out, layout, produce(), meta)
    return ExportResult(out, "single_file", dtype_name, family, records, n_changed, time.monotonic() - t0, size)
