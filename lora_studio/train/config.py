"""``TrainConfig``: every knob of a training run, loaded from presets (plain JSON) and checked on load.

Unknown keys, wrong types and out-of-range values raise ``ConfigError`` naming the key and the value.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError
from ..fileio import write_text_atomic
from ..names import MAX_NAME_BYTES, check_name
from ..preset_files import PRESETS_DIR


DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

CHOICES: dict[str, tuple[str, ...]] = {
    "network": ("lora", "locon", "loha", "lokr"),
    "init": ("gaussian", "pissa"),
    "optimizer": ("adamw", "adamw8bit", "prodigy"),
    "lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "prediction_type": ("auto", "epsilon", "v_prediction"),
    "cache_latents": ("memory", "disk", "none"),
    "save_precision": ("fp32", "fp16", "bf16"),
    "compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "log_with": ("none", "tensorboard", "wandb"),
}


@dataclass
class TrainConfig:
    """One training run. Field names are the JSON keys of a preset."""

    # what to train on
    data_dir: str = ""
    base: str = "demo"                      # "demo", a diffusers folder, a single .safetensors file or a hub id
    description: str = ""                   # free text, for presets
    # where results go: <output_dir>/<run_name>/<output_name>.safetensors
    output_dir: str = "outputs"
    run_name: str = ""                      # empty: derived from the data folder name
    output_name: str = ""                   # empty: the run name
    # images and captions
    resolution: int = 512
    enable_buckets: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_step: int = 64
    caption_extension: str = ".txt"         # ".caption" sidecars are read too when this one is missing
    trigger_word: str = ""
    caption_dropout_rate: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 0                    # tags kept in place at the front when shuffling
    cache_latents: str = "memory"           # "memory", "disk" (for large sets) or "none"
    cache_text_embeddings: bool = True      # only when the text encoder is frozen
    # the LoRA
    network: str = "lora"                   # "lora", "locon" (LyCORIS's name, same layers), "loha" or "lokr"
    rank: int = 16
    alpha: float = 16.0
    conv_rank: int = 0                      # rank of conv targets (LyCORIS conv_dim); 0: rank
    conv_alpha: float = 0.0                 # alpha of conv targets; 0: alpha
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_UNET_TARGETS))
    train_text_encoder: bool = False
    text_encoder_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TE_TARGETS))
    init: str = "gaussian"                  # "gaussian" (B = 0) or "pissa" (principal singular vectors)
    use_rslora: bool = False                # scaling alpha / sqrt(r) instead of alpha / r
    use_dora: bool = False
    lora_dropout: float = 0.0
    # LoHa / LoKr only (LyCORIS's options; peft's LoHaConfig / LoKrConfig)
    use_tucker: bool = False                # Tucker-decomposed convs (peft's use_effective_conv2d)
    lokr_factor: int = -1                   # LoKr's factor: split sizes near this number; -1: near the square root
    decompose_both: bool = False            # LoKr: factor the small matrix w1 too
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    # optimisation
    steps: int = 1000
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    text_encoder_lr: float = 5e-5
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0              # 0 disables clipping
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    # speed and memory switches (see docs of each; all are safe to leave on for a CPU run)
    cast_frozen_weights: bool = True        # with fp16/bf16: frozen weights in that dtype, LoRA weights stay fp32
    channels_last: bool = True              # CUDA only: the UNet in channels-last memory format (tensor cores)
    fused_optimizer: bool = True            # CUDA only: torch's fused AdamW kernel (adamw only)
    compile_unet: bool = False              # CUDA only: torch.compile the UNet (minutes of compiling first)
    compile_mode: str = "default"           # torch.compile's mode; "reduce-overhead" replays CUDA graphs
    offload_cached_models: bool = True      # CUDA only: VAE/text encoders to the CPU once their outputs are cached
    lean_backward: bool = False             # low-memory switch: frozen convs/norms, SiLUs, GEGLUs keep less for the
                                            # backward (same results; costs eager speed, bench/RESULTS.md)
    min_snr_gamma: float = 0.0              # 0 disables min-SNR weighting; 5 is the paper's value
    noise_offset: float = 0.0
    prediction_type: str = "auto"           # "auto" takes the base model scheduler's
    seed: int = 42
    # saving, resuming, samples
    save_every_n_steps: int = 0
    save_every_n_epochs: int = 0
    save_state_every_n_steps: int = 0
    save_precision: str = "fp16"
    resume: bool | str = False              # True: the run folder's latest state; a string: a state folder
    sample_every_n_steps: int = 0
    sample_prompts: list[str] = field(default_factory=list)
    sample_seeds: list[int] = field(default_factory=lambda: [0])
    sample_steps: int = 20
    sample_guidance: float = 7.0
    # seeing training: curves for TensorBoard / Weights & Biases, validation loss on held-out pictures
    log_with: str = "none"                  # "tensorboard" (event files in <run>/logs) or "wandb"
    validation_split: float = 0.0           # share of the images held out of training for validation (0: none)
    validation_dir: str = ""                # or a separate folder of validation images
    validate_every_n_steps: int = 0         # with a validation set: every N steps (0: at the end only)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "config") -> "TrainConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a JSON object of settings, not {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}. "
                              f"Remove them or fix the spelling; known keys are: {', '.join(sorted(known))}.")
        values = {k: _check_type(k, v, where) for k, v in data.items()}
        cfg = cls(**values)
        cfg.validate(where)
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "TrainConfig":
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read config {p}: {err.strerror or err}. Check the path.") from err
        except UnicodeDecodeError as err:
            raise ConfigError(f"config {p} is not UTF-8 text ({err}). Save it as UTF-8 and try again; "
                              "check the path if it is not a JSON file.") from err
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{p} is not valid JSON: {err}. Fix the file.") from err
        return cls.from_dict(data, where=str(p))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            write_text_atomic(path, text)
        return text

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some settings changed, checked like a loaded preset."""
        return TrainConfig.from_dict({**self.to_dict(), **changes}, where="settings")

    # ------------------------------------------------------------------ derived names
    def resolved_run_name(self) -> str:
        if self.run_name:
            return self.run_name
        stem = Path(self.data_dir).name if self.data_dir else "lora"
        return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.")[:MAX_NAME_BYTES] or "lora"

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.resolved_run_name()

    def resolved_output_name(self) -> str:
        return self.output_name or self.resolved_run_name()

    # ------------------------------------------------------------------ checks
    def validate(self, where: str = "config") -> None:
        def bad(key: str, rule: str) -> ConfigError:
            return ConfigError(f"{where}: {key} = {getattr(self, key)!r} is out of range: {rule}.")

        for key in ("resolution", "rank", "steps", "batch_size", "gradient_accumulation_steps", "sample_steps",
                    "bucket_reso_step", "min_bucket_reso", "max_bucket_reso"):
            if getattr(self, key) <= 0:
                raise bad(key, "it must be a positive integer")
        for key in ("alpha", "learning_rate", "adam_epsilon"):
            if not getattr(self, key) > 0:
                raise bad(key, "it must be greater than 0")
        for key in ("text_encoder_lr", "weight_decay", "conv_rank", "conv_alpha", "max_grad_norm", "min_snr_gamma", "noise_offset",
                    "keep_tokens", "lr_warmup_steps", "save_every_n_steps", "save_every_n_epochs",
                    "save_state_every_n_steps", "sample_every_n_steps", "validate_every_n_steps"):
            if getattr(self, key) < 0:
                raise bad(key, "it must be 0 or more")
        for key in ("caption_dropout_rate", "lora_dropout", "validation_split", "rank_dropout", "module_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise bad(key, "it must be in [0, 1)")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise bad(key, "it must be in [0, 1)")
        if self.min_bucket_reso > self.max_bucket_reso:
            raise ConfigError(f"{where}: min_bucket_reso = {self.min_bucket_reso} is larger than max_bucket_reso = "
                              f"{self.max_bucket_reso}. Swap them.")
        if self.resolution % 8:
            raise bad("resolution", "it must be a multiple of 8 (the VAE and UNet downsample by 8)")
        if self.bucket_reso_step % 8:
            raise bad("bucket_reso_step", "it must be a multiple of 8")
        for key, options in CHOICES.items():
            if getattr(self, key) not in options:
                raise ConfigError(f"{where}: {key} = {getattr(self, key)!r} is not one of {', '.join(options)}; "
                                  "use one of those.")
        if not self.target_modules:
            raise ConfigError(f"{where}: target_modules is empty; name at least one layer, e.g. {list(DEFAULT_UNET_TARGETS)}.")
        if self.train_text_encoder and not self.text_encoder_target_modules:
            raise ConfigError(f"{where}: train_text_encoder is on but text_encoder_target_modules is empty.")
        if self.caption_extension and not self.caption_extension.startswith("."):
            raise ConfigError(f"{where}: caption_extension = {self.caption_extension!r} must start with a dot, e.g. '.txt'.")
        if self.validation_split and self.validation_dir:
            raise ConfigError(f"{where}: validation_split = {self.validation_split!r} and validation_dir = "
                              f"{self.validation_dir!r} are both set; choose one (set the other to 0 / \"\").")
        if self.validate_every_n_steps and not (self.validation_split or self.validation_dir):
            raise ConfigError(f"{where}: validate_every_n_steps = {self.validate_every_n_steps} but there is no "
                              "validation set; set validation_split (e.g. 0.1) or validation_dir as well.")
        if self.init == "pissa" and self.use_dora:
            raise ConfigError(f"{where}: init = 'pissa' cannot be combined with use_dora = true; choose one.")
        self._validate_network(where)
        for key in ("run_name", "output_name"):  # each becomes a file or folder name under output_dir
            if getattr(self, key):
                check_name(getattr(self, key), f"{where}: {key}")

    def _validate_network(self, where: str) -> None:
        lycoris = self.network in ("loha", "lokr")
        lora_only = {"use_dora": self.use_dora, "use_rslora": self.use_rslora, "init": self.init != "gaussian",
                     "lora_dropout": self.lora_dropout > 0}
        for key, on in lora_only.items():
            if lycoris and on:
                raise ConfigError(f"{where}: {key} = {getattr(self, key)!r} works with network 'lora' or 'locon' "
                                  f"only, not {self.network!r}; turn it off or change the network"
                                  + (" (LoHa/LoKr have rank_dropout and module_dropout)." if key == "lora_dropout"
                                     else "."))
        lycoris_only = {"use_tucker": self.use_tucker, "rank_dropout": self.rank_dropout > 0,
                        "module_dropout": self.module_dropout > 0}
        for key, on in lycoris_only.items():
            if not lycoris and on:
                raise ConfigError(f"{where}: {key} = {getattr(self, key)!r} works with network 'loha' or 'lokr' "
                                  f"only, not {self.network!r}; turn it off or change the network.")
        for key, on in {"lokr_factor": self.lokr_factor != -1, "decompose_both": self.decompose_both}.items():
            if self.network != "lokr" and on:
                raise ConfigError(f"{where}: {key} = {getattr(self, key)!r} works with network 'lokr' only, "
                                  f"not {self.network!r}; remove it or set network to 'lokr'.")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise ConfigError(f"{where}: lokr_factor = {self.lokr_factor} is out of range: it must be -1 (sizes "
                              "near the square root) or a positive whole number such as 8.")


# JSON types each field accepts. Hand-written (rather than read from annotations) to keep the rules explicit.
def _field_kind(name: str) -> str:
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    return str(f.type)


def _check_type(key: str, value: Any, where: str) -> Any:
    kind = _field_kind(key)

    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {key} = {value!r} has the wrong type ({type(value).__name__}); "
                           f"it must be {expected}.")

    if kind == "bool":
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise wrong("a whole number")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if kind == "bool | str":
        if not isinstance(value, (bool, str)):
            raise wrong("true, false or a folder path")
        return value
    if kind == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong("a list of strings")
        return list(value)
    if kind == "list[int]":
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise wrong("a list of whole numbers")
        return list(value)
    raise AssertionError(f"no type rule for {key} ({kind})")  # a bug: every field needs a rule


def list_presets(kind_prefix: str = "") -> list[str]:
    """Names of presets in ``presets/`` (without ``.json``)."""
    if not PRESETS_DIR.is_dir():
        return []
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json") if p.stem.startswith(kind_prefix))


def load_preset(name: str, presets_dir: str | os.PathLike | None = None) -> TrainConfig:
    """Load ``presets/<name>.json`` (or a path to a .json file) into a ``TrainConfig``."""
    folder = Path(presets_dir) if presets_dir else PRESETS_DIR
    candidate = Path(name)
    path = candidate if candidate.suffix == ".json" and candidate.exists() else folder / f"{name}.json"
    if not path.exists():
        available = ", ".join(list_presets()) or "none"
        raise ConfigError(f"training preset {name!r} not found (looked for {path}). Available presets: {available}.")
    return TrainConfig.from_json(path)
