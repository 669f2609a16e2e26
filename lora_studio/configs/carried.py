"""The diffusers configs a merged checkpoint carries in its own header, so any size of model loads back exactly.

A single file has no configs; the shipped ones (``sd15/``, ``sd21/``, ``sdxl/``) only fit the published sizes.
Every checkpoint LoRA Studio writes stores the config-only folder of the model it came from as one metadata
value, ``lora_studio.configs``: a JSON object of relative file name -> file text (``model_index.json``,
``unet/config.json``, ..., and the tokenizer files when the tokenizer is not the standard CLIP one, as the demo
model's is not). Loading writes them back into a temporary folder for ``from_single_file(config=...)``.
"""

from __future__ import annotations

import json
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..errors import InputFileError
from . import config_dir
from .derived import ShapesUnclear, derived_configs

CONFIGS_KEY = "lora_studio.configs"
CLIP_VOCAB = 49408   # the standard tokenizer (shipped in clip-tokenizer/): not carried
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler", "tokenizer", "tokenizer_2")
_NAME = re.compile(r"^(model_index\.json|(%s)/[\w.-]+\.(json|txt))$" % "|".join(COMPONENTS))


def _standard_tokenizer(folder: Path) -> bool:
    vocab = folder / "vocab.json"
    if vocab.is_file():
        try:
            return len(json.loads(vocab.read_text(encoding="utf-8"))) == CLIP_VOCAB
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
    return False


def configs_of_folder(folder: str | Path) -> dict[str, str]:
    """The config files of a diffusers (or config-only) folder, by relative name; weights are left out, and so is
    a standard CLIP tokenizer (the loader supplies that one)."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or not _NAME.match(rel):
            continue
        if rel.startswith("tokenizer") and _standard_tokenizer(path.parent):
            continue
        files[rel] = path.read_text(encoding="utf-8")
    return files


def configs_of_pipeline(pipe) -> dict[str, str]:
    """``configs_of_folder`` of a loaded pipeline (its configs and tokenizers saved to a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="lora-studio-cfg-") as tmp:
        root = Path(tmp)
        pipe.save_config(root)
        for name in COMPONENTS:
            part = getattr(pipe, name, None)
            if part is None:
                continue
            if hasattr(part, "save_config"):
                part.save_config(root / name)
            elif hasattr(part, "save_pretrained") and not hasattr(part, "state_dict"):  # a tokenizer
                part.save_pretrained(root / name)
            else:  # a transformers model: its config only
                part.config.save_pretrained(root / name)
        return configs_of_folder(root)


def carried_configs(metadata: dict[str, str], source: str) -> dict[str, str] | None:
    """The configs a checkpoint's metadata carries (checked: known file names, text values), or None."""
    raw = metadata.get(CONFIGS_KEY)
    if raw is None:
        return None
    try:
        files = json.loads(raw)
    except json.JSONDecodeError as err:
        raise InputFileError(f"{source}: its {CONFIGS_KEY} metadata is not JSON ({err}). Pass a matching config "
                             "folder with --config-dir.") from err
    bad = [k for k, v in files.items() if not _NAME.match(str(k)) or not isinstance(v, str)] \
        if isinstance(files, dict) else ["(not an object)"]
    if bad or "model_index.json" not in files:
        raise InputFileError(f"{source}: its {CONFIGS_KEY} metadata is not a config folder "
                             f"({', '.join(map(str, bad[:3])) or 'no model_index.json'}). Pass a matching config "
                             "folder with --config-dir.")
    return files


@contextmanager
def config_folder(files: dict[str, str]) -> Iterator[Path]:
    """``files`` (relative name -> text) written into a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="lora-studio-cfg-") as tmp:
        root = Path(tmp)
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text, encoding="utf-8")
        yield root


@contextmanager
def single_file_configs(family, metadata: dict[str, str], source: str, given: Path | None = None,
                        header: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """The config folder for a single-file checkpoint of ``family``: ``given`` (the user's ``--config-dir``), else
    the configs the file carries, else configs derived from the shapes in its ``header`` (``derived.py``), else
    the shipped ones for the family's published sizes (which then fail to load, naming ``--config-dir``)."""
    files = None if given is not None else carried_configs(metadata, source)
    unclear = None
    if given is None and files is None and header is not None:
        try:
            files = derived_configs(header, family)
        except ShapesUnclear as err:
            unclear = err
    if given is not None:
        yield Path(given)
    elif files is not None:
        with config_folder(files) as folder:
            yield folder
    else:
        try:
            yield config_dir(family)
        except InputFileError as err:
            if unclear is None:
                raise
            raise InputFileError(f"{err} (Its configs could not be derived from its tensor shapes either: "
                                 f"{unclear}.)") from err
