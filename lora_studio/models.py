"""Load a base Stable Diffusion pipeline and tell its family (SD1 / SD2 / SDXL).

Sources, in the order they are tried:

* ``None`` or ``"demo"``: the built-in tiny demo model (SD1 structure).
* a diffusers folder (with ``model_index.json``); one whose weights are pickles (``.bin``, no ``.safetensors``)
  only with ``allow_pickle=True``;
* a single-file original-layout (ldm) ``.safetensors`` checkpoint, loaded fully offline with diffusers'
  ``from_single_file`` and the config folders shipped in ``lora_studio/configs`` (or ``config_dir``);
* a pickle checkpoint (``.ckpt``/``.pt``/``.bin``/``.pth``) only with ``allow_pickle=True``, and then with
  ``torch.load(weights_only=True)`` (no code runs while reading);
* a Hugging Face hub id (``owner/name``) from the local cache, or downloaded when ``local_files_only=False``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from .configs import family_tokenizers
from .configs.carried import single_file_configs
from .errors import InputFileError, LoraStudioError, UnsafeFileError
from .family import Family, family_of_pipeline
from .fileio import (PICKLE_SUFFIXES, load_state_dict, not_weights_error, read_head, read_safetensors_header,
                     refuse_pickle, weights_only_refusal)
from .ldm import detect_family_from_ldm_keys
from .progress import ProgressCallback, report
from .demo import ensure_demo_model

Kind = Literal["diffusers", "single_file", "hub", "pipeline"]
SUPPORTED_PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
LDM_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")  # the parts of a pipeline we load weights of
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    pipe: Any                 # a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline
    family: Family
    source: str               # what the caller asked for ("demo", a path, a hub id)
    kind: Kind


def _pipeline_class(family: Family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family is Family.SDXL else StableDiffusionPipeline


def _sd_extras(cls) -> dict:
    """Never load or require a safety checker (LoRA Studio renders locally for the user who runs it)."""
    from diffusers import StableDiffusionPipeline

    return {"safety_checker": None, "requires_safety_checker": False} if cls is StableDiffusionPipeline else {}


def _class_from_index(index: dict, where: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    name = str(index.get("_class_name", ""))
    if name not in SUPPORTED_PIPELINES:
        raise InputFileError(f"{where} is a {name or 'unknown'} model; LoRA Studio loads Stable Diffusion 1.x/2.x "
                             "(StableDiffusionPipeline) and SDXL (StableDiffusionXLPipeline) base models.")
    return StableDiffusionXLPipeline if SUPPORTED_PIPELINES[name] == "sdxl" else StableDiffusionPipeline


def _finish(pipe, source: str, kind: Kind, family: Family | None = None) -> LoadedModel:
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, family=family or family_of_pipeline(pipe), source=source, kind=kind)


# --------------------------------------------------------------------------- diffusers folders and hub ids
def _check_component_weights(folder: Path, allow_pickle: bool) -> list[Path]:
    """Check the weight files diffusers is about to read, so a damaged or wrong file, or a pickle, is named
    here rather than in diffusers' "Unable to load weights" (which, for a pickle, it would otherwise unpickle).
    Returns the pickles it will read (only with ``allow_pickle``).

    Variant files (``name.fp16.safetensors``) are skipped: without ``variant=`` diffusers does not read them.
    """
    to_unpickle: list[Path] = []
    for component in WEIGHT_COMPONENTS:
        files = sorted(f for f in (folder / component).glob("*") if f.is_file() and "." not in f.stem)
        safetensors = [f for f in files if f.suffix == ".safetensors"]
        for f in safetensors:
            read_safetensors_header(f)
        pickles = [f for f in files if f.suffix.lower() in PICKLE_SUFFIXES]
        if safetensors or not pickles:
            continue
        for f in pickles:  # a Git LFS pointer or a web page saved as .bin is no pickle: say what it is
            foreign = not_weights_error(f, read_head(f))
            if foreign is not None and not isinstance(foreign, UnsafeFileError):
                raise foreign
        if not allow_pickle:
            raise UnsafeFileError(
                f"{folder} stores its {component} weights only as {pickles[0].name}, a pickle: loading it means "
                "unpickling, which can run arbitrary code. Use a copy of the model with .safetensors weights, or "
                "pass --allow-pickle if you trust its source (it is then read with torch.load(weights_only=True)).")
        to_unpickle += pickles
    return to_unpickle


def _load_diffusers_folder(folder: Path, source: str, dtype: torch.dtype, allow_pickle: bool = False) -> LoadedModel:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        weights = sorted(p.name for p in folder.glob("*.safetensors"))[:3]
        hint = f" It holds {', '.join(weights)}: give one of those files instead." if weights else ""
        raise InputFileError(f"{folder} is a folder without model_index.json, so it is not a diffusers model.{hint} "
                             "Give a diffusers model folder or a single .safetensors checkpoint.")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputFileError(f"{index_path} cannot be read as JSON ({err}). Download the model again.") from err
    cls = _class_from_index(index, str(folder))
    pickles = _check_component_weights(folder, allow_pickle)
    try:
        # use_safetensors=True: no pickle fallback in any part the check above does not cover
        pipe = cls.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True,
                                   use_safetensors=None if allow_pickle else True, **_sd_extras(cls))
    except LoraStudioError:
        raise
    except Exception as err:  # diffusers/transformers raise many types for missing or corrupt parts
        refused = weights_only_refusal(pickles[0] if len(pickles) == 1 else folder, err)
        if refused is not None:
            raise refused from err
        raise InputFileError(f"could not load the diffusers model in {folder}: {err}. Check that every component "
                             "folder (unet, vae, text_encoder, tokenizer, scheduler) is complete.") from err
    return _finish(pipe, source, "diffusers")


def _load_hub(repo_id: str, dtype: torch.dtype, local_files_only: bool) -> LoadedModel:
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(repo_id, local_files_only=local_files_only)
    except Exception as err:
        if local_files_only:
            raise InputFileError(
                f"{repo_id!r} is not a local file or folder, and the hub model {repo_id!r} is not in the local "
                "Hugging Face cache (LoRA Studio works offline by default). Download the model first "
                f"(e.g. `hf download {repo_id}`), allow downloads, or give the path of a local diffusers "
                "folder or .safetensors checkpoint.") from err
        raise InputFileError(f"could not fetch {repo_id!r} from the Hugging Face hub: {err}. Check the name and "
                             "your connection, or give a local path.") from err
    cls = _class_from_index(index, repo_id)
    try:
        pipe = cls.from_pretrained(repo_id, torch_dtype=dtype, local_files_only=local_files_only, **_sd_extras(cls))
    except Exception as err:
        raise InputFileError(f"could not load hub model {repo_id!r}: {err}") from err
    return _finish(pipe, repo_id, "hub")


# --------------------------------------------------------------------------- single files
def check_config_dir(folder: Path, family: Family) -> Path:
    """``folder`` if it is a config folder for a single-file checkpoint of ``family``, else ``InputFileError``."""
    if not (folder / "model_index.json").is_file():
        raise InputFileError(f"config folder {folder} has no model_index.json. Give a diffusers model folder "
                             f"(weights not needed) whose configs match this {family.label} checkpoint.")
    return folder


def _no_meta_weights(pipe, path: str) -> None:
    """from_single_file leaves parameters on the meta device when the file lacks them: say which part is missing."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        missing = [n for n, p in list(module.named_parameters()) + list(module.named_buffers()) if p.is_meta]
        if missing:
            raise InputFileError(f"{path} has no weights for the {name} ({len(missing)} tensors, e.g. {missing[0]}). "
                                 "It is incomplete: use a full checkpoint.")


# diffusers' scheduler ``prediction_type`` -> the model-spec spelling of ``modelspec.prediction_type``
MODELSPEC_PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v"}


def modelspec_prediction_type(scheduler_value: str | None) -> str | None:
    """``"v_prediction"`` -> ``"v"``, ``"epsilon"`` -> ``"epsilon"`` (what checkpoints declare); None otherwise."""
    return MODELSPEC_PREDICTION_TYPES.get(str(scheduler_value or "").strip().lower())


def scheduler_prediction_type(declared: str | None) -> str | None:
    """A declared ``modelspec.prediction_type`` as diffusers' scheduler spells it (``"v"`` and the diffusers
    spelling ``"v_prediction"`` both read as v); None when absent or unknown."""
    value = str(declared or "").strip().lower()
    return value if value in MODELSPEC_PREDICTION_TYPES else \
        {v: k for k, v in MODELSPEC_PREDICTION_TYPES.items()}.get(value)


def _apply_prediction_type(pipe, metadata: dict[str, str]) -> None:
    """Honour a ``modelspec.prediction_type`` the file declares (SD2 512-base is epsilon, 768 is v)."""
    wanted = scheduler_prediction_type(metadata.get("modelspec.prediction_type"))
    if wanted and pipe.scheduler.config.get("prediction_type") != wanted:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=wanted)


def _from_single_file(path: Path, family: Family, source: str, dtype: torch.dtype, config_dir: Path | None,
                      metadata: dict[str, str], header: Mapping[str, Any]) -> LoadedModel:
    """Load with the configs of ``--config-dir``, else those the file carries, else those its shapes tell."""
    given = check_config_dir(Path(config_dir), family) if config_dir else None
    with single_file_configs(family, metadata, source, given, header) as cfg:
        return _from_config_folder(path, family, source, dtype, cfg, metadata)


def _from_config_folder(path: Path, family: Family, source: str, dtype: torch.dtype, cfg: Path,
                        metadata: dict[str, str]) -> LoadedModel:
    cls = _pipeline_class(family)
    # The shipped configs hold no tokenizer files (one shared CLIP vocabulary): pass the tokenizers in.
    tokenizers = {} if (cfg / "tokenizer").is_dir() else family_tokenizers(family)
    try:
        pipe = cls.from_single_file(str(path), config=str(cfg), local_files_only=True, torch_dtype=dtype,
                                    **tokenizers, **_sd_extras(cls))
    except LoraStudioError:
        raise
    except Exception as err:
        raise InputFileError(
            f"{source} looks like a {family.label} checkpoint but could not be loaded with the {family.label} "
            f"configs in {cfg}: {err}. If it is a non-standard model, pass a config-only diffusers folder that "
            "matches it with --config-dir (config_dir=... from Python).") from err
    _no_meta_weights(pipe, source)
    _apply_prediction_type(pipe, metadata)
    return _finish(pipe, source, "single_file", family)


def _load_safetensors_file(path: Path, source: str, dtype: torch.dtype, config_dir: Path | None) -> LoadedModel:
    header, metadata = read_safetensors_header(path)
    family = detect_family_from_ldm_keys(header, source)
    return _from_single_file(path, family, source, dtype, config_dir, metadata, header)


def _load_pickle_file(path: Path, source: str, dtype: torch.dtype, config_dir: Path | None) -> LoadedModel:
    """Read with weights_only=True (fileio), keep the SD parts, and hand diffusers a temporary safetensors copy."""
    from safetensors.torch import save_file

    tensors, _ = load_state_dict(path, allow_pickle=True)
    tensors = {k: v for k, v in tensors.items() if k.startswith(LDM_PREFIXES)}
    family = detect_family_from_ldm_keys(tensors, source)
    seen: set[int] = set()
    for key, t in tensors.items():  # safetensors refuses tensors that share storage
        ptr = t.untyped_storage().data_ptr()
        tensors[key] = t.clone().contiguous() if ptr in seen else t.contiguous()
        seen.add(ptr)
    with tempfile.TemporaryDirectory(prefix="lora-studio-ckpt-") as tmp:
        tmp_file = Path(tmp) / (path.stem + ".safetensors")
        save_file(tensors, str(tmp_file))
        tensors = {k: {"shape": list(t.shape)} for k, t in tensors.items()}  # header-like: shapes only
        return _from_single_file(tmp_file, family, source, dtype, config_dir, {}, tensors)


# --------------------------------------------------------------------------- entry point
def load_pipeline(source: str | Path | None = None, *, dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                  config_dir: str | Path | None = None, local_files_only: bool = True,
                  progress: ProgressCallback | None = None) -> LoadedModel:
    """Load a base pipeline from ``source`` (see the module docstring) and report its family.

    Every user mistake (missing path, folder without ``model_index.json``, corrupt or truncated file,
    pickle without ``allow_pickle``, unsupported model, hub id while offline) raises ``InputFileError``
    (``UnsafeFileError`` for pickles) with a message that says what to do.
    """
    report(progress, "load", 0, 1, f"loading {source or 'demo'}")
    if source is None or str(source).strip().lower() == "demo":

        loaded = _load_diffusers_folder(ensure_demo_model(progress), "demo", dtype)
        loaded.family = Family.SD1
    else:
        text = str(source).strip()
        path = Path(text).expanduser()
        cfg = Path(config_dir).expanduser() if config_dir else None
        if path.is_dir():
            loaded = _load_diffusers_folder(path, text, dtype, allow_pickle)
        elif path.is_file():
            suffix = path.suffix.lower()
            if suffix == ".safetensors":
                loaded = _load_safetensors_file(path, text, dtype, cfg)
            elif suffix in PICKLE_SUFFIXES:
                refuse_pickle(path, allow_pickle)
                loaded = _load_pickle_file(path, text, dtype, cfg)
            else:
                raise InputFileError(f"{path} is a {suffix or 'suffix-less'} file; a base model is a diffusers "
                                     "folder or a .safetensors checkpoint.")
        elif _HUB_ID.match(text) and not text.lower().endswith((".safetensors", *PICKLE_SUFFIXES)):
            loaded = _load_hub(text, dtype, local_files_only)
        else:
            raise InputFileError(f"{text} does not exist. Check the path (a diffusers folder or a .safetensors "
                                 "checkpoint), or use 'demo' for the built-in demo model.")
    report(progress, "load", 1, 1, f"loaded {loaded.family.label} model ({loaded.kind})")
    return loaded


def _header_stats(headers: list[dict]) -> tuple[int, int, dict[str, int]]:
    dtypes: dict[str, int] = {}
    params = tensors = 0
    for header in headers:
        for info in header.values():
            tensors += 1
            dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + 1
            n = 1
            for d in info["shape"]:
                n *= int(d)
            params += n
    return tensors, params, dtypes


def _describe_diffusers_folder(folder: Path) -> dict[str, Any]:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise InputFileError(f"{folder} is a folder without model_index.json, so it is not a diffusers model. "
                             "Give a diffusers model folder or a single .safetensors file.")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        unet_cfg = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputFileError(f"{folder}: cannot read model_index.json or unet/config.json ({err}).") from err
    family, family_error = None, None
    try:
        _class_from_index(index, str(folder))
        has_te2 = bool((index.get("text_encoder_2") or [None])[0])
        family = Family.SDXL if has_te2 else (Family.SD2 if unet_cfg.get("cross_attention_dim") == 1024 else Family.SD1)
    except InputFileError as err:
        family_error = str(err)
    files = [f for f in folder.rglob("*.safetensors") if f.is_file()]
    tensors, params, dtypes = _header_stats([read_safetensors_header(f)[0] for f in files])
    components = {k: v[1] for k, v in index.items()
                  if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0]}
    return {
        "path": str(folder), "kind": "diffusers", "family": family, "family_error": family_error,
        "tensors": tensors, "parameters": params, "size_bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
        "dtypes": dtypes, "dtype": max(dtypes, key=dtypes.get) if dtypes else None,
        "components": components, "metadata": {},
    }


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """What a base model is, from file headers and configs only (no tensors are read), for the inspector.

    Returns ``{"path", "kind": "single_file" | "diffusers", "family": Family | None, "family_error": str | None,
    "tensors": int, "parameters": int, "size_bytes": int, "dtypes": {dtype: count}, "dtype": most common,
    "components": {name: count or class}, "metadata": {str: str}}``. A file that is not a base checkpoint still
    describes (``family`` None, ``family_error`` says why); an unreadable one raises ``InputFileError``
    (``UnsafeFileError`` for pickles, which are never opened here).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        return _describe_diffusers_folder(p)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(p, allow_pickle=False)
    header, metadata = read_safetensors_header(p)
    tensors, params, dtypes = _header_stats([header])
    components = {prefix.rstrip("."): sum(k.startswith(prefix) for k in header) for prefix in LDM_PREFIXES}
    try:
        family, family_error = detect_family_from_ldm_keys(header, str(p)), None
    except InputFileError as err:
        family, family_error = None, str(err)
    return {
        "path": str(p), "kind": "single_file", "family": family, "family_error": family_error,
        "tensors": tensors, "parameters": params, "size_bytes": p.stat().st_size, "dtypes": dtypes,
        "dtype": max(dtypes, key=dtypes.get) if dtypes else None,
        "components": {k: v for k, v in components.items() if v}, "metadata": metadata,
    }


def load_base(base: Any, *, dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
              config_dir: str | Path | None = None, progress: ProgressCallback | None = None) -> LoadedModel:
    """The one way every command and tab gets its base model: ``base`` is what a user names ("demo", a diffusers
    folder, a single-file checkpoint, a hub id; see ``load_pipeline``), or a model already loaded (a
    ``LoadedModel``, or a bare pipeline, which the app and the tests hand over)."""
    if isinstance(base, LoadedModel):
        return base
    if base is None or isinstance(base, (str, os.PathLike)):
        return load_pipeline(None if base is None else str(base), dtype=dtype, allow_pickle=allow_pickle,
                             config_dir=config_dir, progress=progress)
    return LoadedModel(base, family_of_pipeline(base), "pipeline", "pipeline")
