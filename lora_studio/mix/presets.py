"""Mixing presets: which LoRAs at which strengths, plus the generation settings, as plain JSON.

::

    {"description": "...", "base": "demo", "lora_dir": "outputs/loras",
     "loras": [{"file": "stripes.safetensors", "strength": 0.8, "te_strength": 0.5, "blocks": {"up": 0.5}}],
     "prompt": "a red circle", "negative_prompt": "", "steps": 20, "cfg": 4.0, "seed": 0,
     "width": 64, "height": 64, "sampler": "DDIM"}

Unknown keys are a ``ConfigError`` naming the key. A relative ``file`` is looked up beside the preset, then in
``lora_dir`` (by path or by LoRA name), then from the working folder.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError, InputFileError
from ..fileio import write_text_atomic
from ..preset_files import PRESETS_DIR
from ..render import GenParams
from .args import SlotSpec, parse_lora_arg
from ..prompt import strip_lora_tags
from ..library import resolve



@dataclass
class PresetLora:
    file: str
    strength: float = 1.0
    te_strength: float | None = None          # None: the text encoder follows ``strength``
    blocks: dict[str, float] = field(default_factory=dict)   # LoraMixer block weights ("down", "up.1", ...)
    name: str | None = None                   # the name in the mix (default: the file's stem)


@dataclass
class MixPreset:
    loras: list[PresetLora] = field(default_factory=list)
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg: float = 4.0
    seed: int = 0
    width: int = 64
    height: int = 64
    sampler: str = "DDIM"
    base: str = "demo"
    lora_dir: str | None = None
    description: str = ""

    def gen_params(self, model_name: str | None = None) -> GenParams:
        return GenParams(self.prompt, self.negative_prompt, self.steps, self.cfg, self.seed, self.width,
                         self.height, self.sampler, model_name or Path(self.base).stem or self.base).check()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["loras"] = [{k: v for k, v in lo.items() if v not in (None, {})} for lo in data["loras"]]
        return data


def _number(value: Any, where: str, whole: bool = False) -> float | int:
    ok = isinstance(value, int) if whole else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or (not whole and not math.isfinite(value)):
        kind = "a whole number" if whole else "a finite number"
        raise ConfigError(f"{where} = {value!r} must be {kind}.")
    return int(value) if whole else float(value)


def _unknown(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    bad = sorted(set(data) - allowed)
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, bad))}. Known keys: {', '.join(sorted(allowed))}.")


def _lora_from_dict(item: Any, where: str) -> PresetLora:
    if isinstance(item, str):                  # "file", "file:0.8" or "file:0.8:0.5", as typed anywhere else
        arg = parse_lora_arg(item)
        return PresetLora(arg.ref, arg.strength, arg.te_strength)
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be an object like {{\"file\": \"x.safetensors\", \"strength\": 0.8}}.")
    _unknown(item, {f.name for f in fields(PresetLora)}, where)
    if not isinstance(item.get("file"), str) or not item["file"]:
        raise ConfigError(f"{where} needs \"file\": the LoRA's path or name.")
    blocks = item.get("blocks") or {}
    if not isinstance(blocks, dict):
        raise ConfigError(f"{where}.blocks must be an object like {{\"down\": 1.0, \"up\": 0.5}}.")
    te = item.get("te_strength")
    name = item.get("name")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{where}.name = {name!r} must be text.")
    return PresetLora(item["file"], _number(item.get("strength", 1.0), f"{where}.strength"),
                      None if te is None else _number(te, f"{where}.te_strength"),
                      {str(k): _number(v, f"{where}.blocks.{k}") for k, v in blocks.items()}, name)


def preset_from_dict(data: Any, where: str = "mix preset") -> MixPreset:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object, not {type(data).__name__}.")
    _unknown(data, {f.name for f in fields(MixPreset)}, where)
    loras = data.get("loras", [])
    if not isinstance(loras, list):
        raise ConfigError(f"{where}: \"loras\" must be a list of {{\"file\": ..., \"strength\": ...}} objects.")
    kw: dict[str, Any] = {"loras": [_lora_from_dict(x, f"{where}: loras[{i}]") for i, x in enumerate(loras)]}
    for key in ("prompt", "negative_prompt", "sampler", "base", "description"):
        if key in data:
            if not isinstance(data[key], str):
                raise ConfigError(f"{where}: {key} = {data[key]!r} must be text.")
            kw[key] = data[key]
    if data.get("lora_dir") is not None:
        kw["lora_dir"] = str(data["lora_dir"])
    for key in ("steps", "seed", "width", "height"):
        if key in data:
            kw[key] = _number(data[key], f"{where}: {key}", whole=True)
    if "cfg" in data:
        kw["cfg"] = _number(data["cfg"], f"{where}: cfg")
    preset = MixPreset(**kw)
    try:
        preset.gen_params()
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return preset


def list_mix_presets(folder: str | os.PathLike | None = None) -> list[str]:
    folder = Path(folder) if folder else PRESETS_DIR
    return sorted(p.stem for p in folder.glob("mix-*.json")) if folder.is_dir() else []


def load_mix_preset(name_or_path: str | os.PathLike) -> tuple[MixPreset, Path]:
    """Load a preset file (or ``presets/<name>.json``); returns the preset and the file it came from."""
    p = Path(name_or_path)
    if not p.is_file():
        named = PRESETS_DIR / f"{p.name}.json"
        if p.suffix != ".json" and named.is_file():
            p = named
        else:
            raise ConfigError(f"mix preset {str(name_or_path)!r} not found. Give a .json path or one of: "
                              f"{', '.join(list_mix_presets()) or 'none'}.")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read mix preset {p}: {err.strerror or err}.") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"mix preset {p} is not UTF-8 text ({err}). Save it as UTF-8 and try again.") from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"{p} is not valid JSON: {err}. Fix the file.") from err
    return preset_from_dict(data, str(p)), p


def save_mix_preset(preset: MixPreset, path: str | os.PathLike) -> Path:
    path = Path(path)
    write_text_atomic(path, json.dumps(preset.to_dict(), indent=2) + "\n")
    return path


def preset_from_mixer(mixer, params: GenParams, base: str = "demo", lora_dir: str | None = None) -> MixPreset:
    """The mixer's current LoRAs and strengths with ``params``, ready to save. The prompt is saved without
    its ``<lora:...>`` tags: those LoRAs are in the mix, hence in ``loras``, already."""

    loras = [PresetLora(str(e.path), e.strength, e.te_strength, dict(e.block_weights),
                        None if e.path is not None and Path(e.path).stem == e.name else e.name)
             for e in mixer.entries]
    return MixPreset(loras, strip_lora_tags(params.prompt), params.negative_prompt, params.steps, params.cfg, params.seed,
                     params.width, params.height, params.sampler, base, lora_dir)


def resolve_lora_file(file: str, preset_dir: Path | None, lora_dir: str | os.PathLike | None) -> Path:
    """Find a preset entry's file (see the module docstring for the order)."""

    p = Path(file).expanduser()
    if p.is_absolute():
        if p.is_file():
            return p
        raise InputFileError(f"LoRA file {p} in the preset does not exist. Fix its path in the preset.")
    tried = []
    if preset_dir is not None:
        tried.append(preset_dir / p)
        if (preset_dir / p).is_file():
            return preset_dir / p
    if lora_dir is not None:
        tried.append(Path(lora_dir) / p)
        if Path(lora_dir).is_dir():
            try:
                return resolve(file, lora_dir)
            except InputFileError:
                pass
    tried.append(Path.cwd() / p)
    if p.is_file():
        return p
    if lora_dir is None:
        advice = "Fix the file name, set \"lora_dir\" in the preset, or pass --lora-dir."
    elif not Path(lora_dir).is_dir():
        advice = f"The LoRA folder {lora_dir} does not exist: fix \"lora_dir\" in the preset or pass --lora-dir."
    else:
        advice = f"Fix the file name in the preset, or put the file in {lora_dir}."
    raise InputFileError(f"LoRA {file!r} from the preset was not found; looked at: "
                         f"{', '.join(map(str, tried))}. {advice}")


def preset_slots(preset: MixPreset, preset_dir: Path | None = None,
                 lora_dir: str | os.PathLike | None = None) -> list[SlotSpec]:
    """The preset's LoRAs as slots for ``MixSession.set_loras``, each file found (see ``resolve_lora_file``)."""
    folder = lora_dir if lora_dir is not None else preset.lora_dir
    if folder is not None and preset_dir is not None and not Path(folder).is_absolute():
        beside = preset_dir / folder
        folder = beside if beside.is_dir() else folder
    return [SlotSpec(str(resolve_lora_file(lo.file, preset_dir, folder)), lo.strength, lo.te_strength,
                     dict(lo.blocks), lo.name) for lo in preset.loras]
