"""Image generation with a named sampler, and PNGs that carry their generation parameters.

``render`` runs a diffusers pipeline with AUTOMATIC1111-style settings (sampler name, steps, CFG, seed, size)
and returns the image with its "infotext": the text A1111 writes into the PNG ``parameters`` chunk, which
A1111's "PNG Info" tab, Civitai and ComfyUI read back::

    a red circle <lora:stripes:0.8>
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 4.0, Seed: 0, Size: 512x512,
    Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "stripes: 0123456789ab"

(one parameter line; A1111 1.9+ writes a Karras sampler as the plain sampler plus ``Schedule type: Karras``).

Which LoRAs are applied is the caller's business (``lora_studio.mix.LoraMixer``); ``render`` only records the
``(name, strength)`` pairs it is given as ``<lora:...>`` tags. The infotext writer and parser are written here by
hand because no installed library speaks this format.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import random
import re
import struct
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import ConfigError, InputFileError
from .fileio import atomic_path, write_text_atomic
from .progress import ProgressCallback, report
from .prompt import parse_prompt, strip_lora_tags
from .prompt_weights import prompt_embeds

# A1111 sampler name -> (diffusers scheduler class, extra config). The mapping follows diffusers' own
# table of A1111 equivalents; "Karras" variants switch on Karras sigmas.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
    "DPM++ 2S": ("DPMSolverSinglestepScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
}

# Config keys a sampler entry may set: dropped from the base config first, so a pipeline whose scheduler
# came from a Karras/SDE entry does not pass those choices on to the next sampler.
_SAMPLER_KEYS = {key for _, extra in SAMPLERS.values() for key in extra}

# Schedulers that import a package of their own when they run (diffusers' LMS integrates with scipy).
# requirements.txt installs these; the check turns an install that lacks one into a message, not a traceback.
_NEEDS_PACKAGE = {"LMSDiscreteScheduler": "scipy"}


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def canonical_sampler(name: str) -> str:
    """The table's spelling of ``name`` (case and spacing forgiven), or ``ConfigError`` listing the choices."""
    if name in SAMPLERS:
        return name
    key = " ".join(str(name).split()).lower()
    for known in SAMPLERS:
        if known.lower() == key:
            return known
    raise ConfigError(f"unknown sampler {name!r}. Choose one of: {', '.join(SAMPLERS)}.")


def make_scheduler(name: str, base_config: Any):
    """A new diffusers scheduler for the A1111 sampler ``name``, built from the pipeline's scheduler config."""
    import diffusers

    sampler = canonical_sampler(name)
    cls_name, extra = SAMPLERS[sampler]
    package = _NEEDS_PACKAGE.get(cls_name)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"the {sampler!r} sampler needs the {package} package, which is not installed. "
                          f"Install it (pip install {package}, or pip install -r requirements.txt) or choose "
                          "another sampler.")
    cls = getattr(diffusers, cls_name)
    config = {k: v for k, v in dict(base_config).items() if k not in _SAMPLER_KEYS}
    config.update(extra)
    return cls.from_config(config)


@dataclass
class GenParams:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg: float = 4.0            # the demo model draws best near 4; SD1.5 users usually pick 7
    seed: int = 0               # -1 picks a random seed; the seed used is recorded
    width: int = 64
    height: int = 64
    sampler: str = "DDIM"
    model_name: str = "demo"
    clip_skip: int = 1          # A1111's "Clip skip": 2 reads the text encoder's penultimate layer
    model_hash: str = ""        # A1111's "Model hash": AutoV2 of the checkpoint file ("" for demo / a folder)

    def check(self) -> "GenParams":
        """Raise ``ConfigError`` for values the pipeline would reject; return self with the canonical sampler."""
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be a whole number of at least 1, got {self.steps!r}.")
        if isinstance(self.cfg, bool) or not isinstance(self.cfg, (int, float)) or not math.isfinite(self.cfg):
            raise ConfigError(f"cfg must be a finite number, got {self.cfg!r}.")
        if isinstance(self.clip_skip, bool) or not isinstance(self.clip_skip, int) or self.clip_skip < 1:
            raise ConfigError(f"clip skip must be a whole number of at least 1, got {self.clip_skip!r}. "
                              "Use 1 (no skip) or 2.")
        for what, v in (("width", self.width), ("height", self.height)):
            if not isinstance(v, int) or v < 8 or v % 8:
                raise ConfigError(f"{what} must be a positive multiple of 8, got {v!r}. Try 64 for the demo "
                                  "model or 512 / 1024 for SD1.5 / SDXL.")
        return replace(self, sampler=canonical_sampler(self.sampler), cfg=float(self.cfg))


@dataclass
class RenderedImage:
    image: Image.Image
    params: GenParams
    loras: list[tuple[str, float, float | None]] = field(default_factory=list)
    infotext: str = ""
    extra: dict[str, Any] = field(default_factory=dict)   # more infotext fields ("Lora hashes")


def _norm_loras(loras: Iterable[Sequence]) -> list[tuple[str, float, float | None]]:
    out = []
    for item in loras:
        name, strength = str(item[0]), float(item[1])
        te = float(item[2]) if len(item) > 2 and item[2] is not None else None
        out.append((name, strength, None if te == strength else te))
    return out


def render(pipe, params: GenParams, loras: Iterable[Sequence] = (), progress: ProgressCallback | None = None,
           lora_hashes: Mapping[str, str] | None = None) -> RenderedImage:
    """Generate one image. The pipeline's own scheduler is put back afterwards; the noise comes from a CPU
    generator seeded with ``params.seed``, so a seed gives the same picture on any device. ``lora_hashes``
    (name -> ``lora_hash``) adds A1111's "Lora hashes" field for the LoRAs listed."""

    params = params.check()
    if params.seed < 0:
        params = replace(params, seed=random.randrange(2 ** 32))
    loras = _norm_loras(loras)
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(params.sampler, original.config)

    def on_step(_pipe, step, _t, kwargs):
        # second-order samplers (Heun, DPM2) call back twice per step: count scheduler timesteps
        report(progress, "render", step + 1, len(_pipe.scheduler.timesteps))
        return kwargs

    try:
        # A1111's emphasis, BREAK and 75-token chunks, applied to the text embeddings
        embeds = prompt_embeds(pipe, strip_lora_tags(params.prompt), params.negative_prompt, params.clip_skip)
        result = pipe(**embeds, num_inference_steps=params.steps, guidance_scale=params.cfg,
                      width=params.width, height=params.height,
                      generator=torch.Generator(device="cpu").manual_seed(params.seed),
                      callback_on_step_end=on_step)
    finally:
        pipe.scheduler = original
    extra = hashes_field(loras, lora_hashes)
    return RenderedImage(result.images[0], params, loras, infotext(params, loras, extra), extra)


def lora_hash(path: str | Path) -> str:
    """A1111's short LoRA hash, which its "Lora hashes" field holds and Civitai uses to link a picture to the
    LoRA: the first 12 hex digits of the SHA-256 of the file's tensor data (everything after the safetensors
    header; kohya's "addnet" hash), so editing the metadata does not change it."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            fh.seek(8 + n)
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except (OSError, struct.error) as err:
        raise InputFileError(f"cannot hash {path}: {err}") from err
    return digest.hexdigest()[:12]


def hashes_field(loras: Iterable[Sequence], hashes: Mapping[str, str] | None) -> dict[str, str]:
    """``{"Lora hashes": "a: 0123456789ab, b: ..."}`` for the listed LoRAs that have a hash (else empty)."""
    names = [str(t[0]) for t in loras]
    text = ", ".join(f"{n}: {hashes[n]}" for n in names if hashes and n in hashes)
    return {"Lora hashes": text} if text else {}


# --------------------------------------------------------------------------- infotext
def _num(x: float) -> str:
    """Shortest exact text of a float: 1.0 -> "1", 0.8 -> "0.8" (round-trips through float())."""
    s = repr(float(x))
    return s[:-2] if s.endswith(".0") else s


def lora_tag(name: str, strength: float, te_strength: float | None = None) -> str:
    """A1111's tag. With two numbers A1111 reads the first as the text-encoder and the second as the UNet
    multiplier: ``<lora:name:TE:UNET>``."""
    if te_strength is None or te_strength == strength:
        return f"<lora:{name}:{_num(strength)}>"
    return f"<lora:{name}:{_num(te_strength)}:{_num(strength)}>"


def _quote(value: Any) -> str:
    """A1111 quotes a value as JSON when it holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def split_sampler(sampler: str) -> tuple[str, str | None]:
    """A1111 1.9+'s spelling: ("DPM++ 2M Karras") -> ("DPM++ 2M", "Karras"); other samplers have no schedule."""
    if sampler.endswith(" Karras") and sampler[:-len(" Karras")] in SAMPLERS:
        return sampler[:-len(" Karras")], "Karras"
    return sampler, None


def infotext(params: GenParams, loras: Iterable[Sequence] = (), extra: dict[str, Any] | None = None) -> str:
    """A1111 1.9+ infotext: the prompt with ``<lora:..>`` tags, the negative prompt, one line of fields."""

    loras = _norm_loras(loras)
    prompt = " ".join(p for p in [strip_lora_tags(params.prompt)] + [lora_tag(*t) for t in loras] if p)
    lines = [prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    sampler, schedule = split_sampler(params.sampler)
    fields_ = {"Steps": params.steps, "Sampler": sampler, "Schedule type": schedule, "CFG scale": float(params.cfg),
               "Seed": params.seed, "Size": f"{params.width}x{params.height}", "Model hash": params.model_hash,
               "Model": params.model_name, "Clip skip": params.clip_skip if params.clip_skip != 1 else None}
    fields_.update(extra or {})
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields_.items() if v is not None and v != ""))
    return "\n".join(lines)


_PARAM_RE = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def parse_infotext(text: str) -> dict[str, Any]:
    """Read A1111 infotext into typed fields: ``prompt`` (LoRA tags removed), ``negative_prompt``, ``steps``,
    ``sampler`` (a Karras "Schedule type" joined back on: "DPM++ 2M Karras"; the old one-field spelling is read
    too), ``cfg``, ``seed``, ``width``, ``height``, ``model_name``, ``model_hash`` (those present), ``loras`` as
    ``(name, strength, te_strength)`` and ``extra`` (every other ``key: value`` as text)."""

    *lines, last = text.strip("\n").split("\n")
    if len(_PARAM_RE.findall(last)) < 3:  # no parameter line: everything is prompt
        lines.append(last)
        last = ""
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in lines:
        if line.startswith("Negative prompt:") and not negative_lines:
            negative_lines.append(line[len("Negative prompt:"):].strip())
        elif negative_lines:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    parsed = parse_prompt("\n".join(prompt_lines))
    out: dict[str, Any] = {"prompt": parsed.prompt, "negative_prompt": "\n".join(negative_lines),
                           "loras": [(r.name, r.strength, r.te_strength) for r in parsed.loras]}
    raw = {k.strip(): _unquote(v.strip()) for k, v in _PARAM_RE.findall(last)}
    sampler = raw.pop("Sampler", None)
    schedule = raw.pop("Schedule type", None)   # A1111 >= 1.8 writes "Sampler: DPM++ 2M, Schedule type: Karras"
    if sampler is not None:
        if schedule and schedule.lower() == "karras" and f"{sampler} Karras" in SAMPLERS:
            sampler = f"{sampler} Karras"
        out["sampler"] = sampler
    convert = {"Steps": ("steps", int), "CFG scale": ("cfg", float), "Seed": ("seed", int),
               "Model": ("model_name", str), "Model hash": ("model_hash", str), "Clip skip": ("clip_skip", int)}
    for key, (name, kind) in convert.items():
        if key in raw:
            try:
                out[name] = kind(raw.pop(key))
            except ValueError as err:
                raise InputFileError(f"infotext field {key!r} has a value that is not a {kind.__name__}: {err}") from err
    size = raw.pop("Size", None)
    if size:
        m = re.fullmatch(r"(\d+)x(\d+)", size)
        if not m:
            raise InputFileError(f"infotext field 'Size' should look like 512x512, got {size!r}.")
        out["width"], out["height"] = int(m.group(1)), int(m.group(2))
    out["extra"] = raw
    return out


def params_from_infotext(text: str) -> tuple[GenParams, list[tuple[str, float, float | None]]]:
    """Rebuild ``GenParams`` and the LoRA list from infotext (fields it lacks keep their defaults)."""
    data = parse_infotext(text)
    names = {f.name for f in fields(GenParams)}
    return GenParams(**{k: v for k, v in data.items() if k in names}), data["loras"]


# --------------------------------------------------------------------------- saving
def record(params: GenParams, loras: Iterable[Sequence] = (), extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON sidecar's content: the infotext plus the same values as typed fields."""
    loras = _norm_loras(loras)
    return {"parameters": infotext(params, loras, extra), **asdict(params),
            "loras": [{"name": n, "strength": s, "te_strength": t} for n, s, t in loras],
            "extra": {k: v for k, v in (extra or {}).items()}, "software": "LoRA Studio"}


def save_image_with_parameters(image: Image.Image, path: str | Path, parameters: str,
                               sidecar: dict[str, Any] | None = None) -> Path:
    """Write ``image`` as PNG with a ``parameters`` text chunk, and ``<path>.json`` beside it; both atomically."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"images are saved as PNG; give a path ending in .png, not {path.name!r}.")
    info = PngInfo()
    info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    write_text_atomic(path.with_suffix(".json"),
                      json.dumps(sidecar if sidecar is not None else {"parameters": parameters}, indent=2) + "\n")
    return path


def save_png(rendered: RenderedImage, path: str | Path) -> Path:
    return save_image_with_parameters(rendered.image, path, rendered.infotext,
                                      record(rendered.params, rendered.loras, rendered.extra))


def read_png_parameters(path: str | Path) -> str:
    """The ``parameters`` text of a PNG (as A1111's PNG Info shows it); ``InputFileError`` if it has none."""
    try:
        with Image.open(path) as img:
            text = img.text.get("parameters")  # type: ignore[attr-defined]
    except (OSError, AttributeError) as err:
        raise InputFileError(f"{path} could not be read as a PNG: {err}") from err
    if text is None:
        raise InputFileError(f"{path} has no 'parameters' text chunk; it was not written by LoRA Studio or A1111.")
    return text
