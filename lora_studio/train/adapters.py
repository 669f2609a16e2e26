"""LoRA layers through peft: inject into the UNet / text encoder, export as kohya modules, and take them out again.

peft does the layers, the inits (Gaussian with B = 0, PiSSA, rsLoRA, DoRA) and the scaling. What is written by
hand here: the export to kohya names and alphas (peft has no kohya writer), the PiSSA delta (PiSSA moves the
principal part out of the base weight, so the file must hold ``s·(BA - B0A0)``) and restoring the base layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, LoraFormatError
from ..lora.formats import LoraModule
from ..lora.keys import UnetLayout, kohya_module_name
from .config import TrainConfig
from .networks import ADAPTER, NETWORKS, is_adapter_parameter, network_of


@dataclass
class InjectedLora:
    """The LoRA layers peft put into one model, with what is needed to export and remove them."""

    model: nn.Module
    prefix: str                                     # kohya prefix: "lora_unet_", "lora_te_", ...
    layers: dict[str, nn.Module]                    # module name -> peft LoraLayer
    pissa_start: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (A0, B0)
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # base weights that PiSSA changed
    unet_layout: UnetLayout | None = None           # SDXL UNet: kohya names in the original (ldm) layout
    network: str = "lora"                           # TrainConfig.network

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for n, p in layer.named_parameters()
                if p.requires_grad and is_adapter_parameter(n)]

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable LoRA parameters under stable names (``<module>.<param>``), for saving training state."""
        return {f"{name}.{n}": p for name, layer in self.layers.items() for n, p in layer.named_parameters()
                if p.requires_grad and is_adapter_parameter(n)}


def peft_lora_config(cfg: TrainConfig, targets: list[str], model: nn.Module | None = None):
    """peft's config for ``cfg.network`` (``LoraConfig``, ``LoHaConfig`` or ``LoKrConfig``)."""
    return network_of(cfg).peft_config(cfg, targets, model if model is not None else nn.Module())


def inject_lora(model: nn.Module, cfg: TrainConfig, targets: list[str], prefix: str,
                unet_layout: UnetLayout | None = None) -> InjectedLora:
    """Add trainable LoRA layers to ``model`` (frozen otherwise). Works for UNets and transformers 5.x CLIP
    text encoders alike (``add_adapter`` does not work on the latter). ``unet_layout`` (an SDXL UNet's) makes
    the exported names kohya's original-layout ones (``keys.kohya_module_name``)."""
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    originals = {}
    if cfg.init == "pissa":  # PiSSA rewrites base weights; keep them to restore the base bit for bit afterwards
        originals = {n: m.weight.detach().clone() for n, m in model.named_modules()
                     if isinstance(m, (nn.Linear, nn.Conv2d)) and any(_matches(n, t) for t in targets)}
    too_wide = [(n, m.weight.shape[0], m.weight[0].numel()) for n, m in model.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv2d)) and any(_matches(n, t) for t in targets)
                and cfg.network != "lokr" and cfg.rank > min(m.weight.shape[0], m.weight[0].numel())]
    if too_wide:
        n, out_dim, in_dim = too_wide[0]
        raise ConfigError(f"rank = {cfg.rank} is larger than layer {n} of the {prefix.strip('_')} model allows "
                          f"({out_dim} outputs x {in_dim} inputs: rank {min(out_dim, in_dim)} already changes it "
                          f"fully; {len(too_wide)} target layer(s) affected). Lower rank to "
                          f"{min(min(o, i) for _, o, i in too_wide)} or less.")
    if unet_layout is not None:  # every target needs a kohya SDXL name: refuse before training, not at saving
        for n, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and any(_matches(n, t) for t in targets):
                try:
                    kohya_module_name(prefix, n, unet_layout)
                except LoraFormatError as err:
                    raise ConfigError(str(err)) from err
    model.requires_grad_(False)
    try:
        inject_adapter_in_model(peft_lora_config(cfg, targets, model), model, adapter_name=ADAPTER)
    except ValueError as err:
        raise ConfigError(f"target modules {targets} do not match layers of the {prefix.strip('_')} model ({err}). "
                          "Use names such as to_q, to_k, to_v, to_out.0, ff.net.0.proj, proj_in, conv1 "
                          "(UNet) or q_proj, k_proj, v_proj, out_proj, fc1, fc2 (text encoder).") from err
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and ADAPTER in m.scaling}
    for n, p in model.named_parameters():  # peft leaves only its own layers trainable; make sure of it
        p.requires_grad_(is_adapter_parameter(n))
    pissa_start = {}
    if cfg.init == "pissa":
        pissa_start = {n: (l.lora_A[ADAPTER].weight.detach().clone(), l.lora_B[ADAPTER].weight.detach().clone())
                       for n, l in layers.items()}
        originals = {n: w for n, w in originals.items() if n in layers}
    return InjectedLora(model, prefix, layers, pissa_start, originals, unet_layout, cfg.network)


def skips_input_casts(cfg: TrainConfig) -> bool:
    """Whether the LoRA layers may run without peft's cast of their input to the LoRA weights' dtype, for runs
    under autocast (apply it with peft's ``disable_input_dtype_casting``).

    The LoRA weights train in fp32 while autocast computes in bf16/fp16: peft copies a half-precision input
    to fp32, and autocast copies it straight back for the matmul. Two activation-sized copies per layer and
    step (and their backward), plus the half-precision copy autocast keeps for the backward, for nothing:
    the outputs and gradients are bit-identical without them (``tests/test_train_speed_switches.py`` checks
    this against peft's default). DoRA computes its norm in the input's dtype and dropout rounds differently
    in each dtype, so those runs keep peft's default. Only for autocast: without it an fp32 weight would
    meet a half-precision input.
    """
    return cfg.network in ("lora", "locon") and not (cfg.use_dora or cfg.lora_dropout > 0)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def to_kohya_modules(inj: InjectedLora, dtype: torch.dtype = torch.float32) -> dict[str, LoraModule]:
    """The trained layers as kohya modules: ``up @ down * alpha / rank`` equals what the model adds to each weight
    (relative to the original base weight, also for PiSSA and rsLoRA); DoRA magnitudes as LyCORIS's
    ``dora_scale`` (one per output row: (out, 1) for linear, (out, 1, 1, 1) for conv layers)."""
    out: dict[str, LoraModule] = {}
    for name, layer in inj.layers.items():
        if inj.network in ("loha", "lokr"):          # LyCORIS's tensors: its network writes LyCORIS's tensors
            kohya = kohya_module_name(inj.prefix, name, inj.unet_layout)
            out[kohya] = NETWORKS[inj.network].export(layer, kohya, dtype)
            continue
        down = layer.lora_A[ADAPTER].weight.detach().float()
        up = layer.lora_B[ADAPTER].weight.detach().float()
        scale = float(layer.scaling[ADAPTER])
        if name in inj.pissa_start:  # file delta = s·(B A - B0 A0) as one LoRA of rank 2r
            a0, b0 = (t.float() for t in inj.pissa_start[name])
            down, up = torch.cat([down, a0], 0), torch.cat([up, -b0], 1)
        rank = int(down.shape[0])
        kohya = kohya_module_name(inj.prefix, name, inj.unet_layout)
        mod = LoraModule.from_updown(kohya, down.to(dtype), up.to(dtype), alpha=scale * rank)
        if getattr(layer, "lora_magnitude_vector", None) and ADAPTER in layer.lora_magnitude_vector:
            # peft keeps one magnitude per output row as (out,) or, for convs, (1, out, 1, 1); files carry
            # LyCORIS's layout, (out, 1) / (out, 1, 1, 1), the one ComfyUI reads as per-output
            w = layer.get_base_layer().weight
            magnitude = layer.lora_magnitude_vector[ADAPTER].weight.detach()
            mod.tensors["dora_scale"] = magnitude.reshape(w.shape[0], *[1] * (w.dim() - 1)).to(dtype)
        out[kohya] = mod
    return out


def remove_lora(inj: InjectedLora) -> None:
    """Put the base layers back in place of peft's wrappers (restoring weights PiSSA changed)."""
    for name, layer in inj.layers.items():
        base = layer.get_base_layer()
        if name in inj.originals:
            with torch.no_grad():
                base.weight.copy_(inj.originals[name])
        parent_name, _, child = name.rpartition(".")
        parent = inj.model.get_submodule(parent_name) if parent_name else inj.model
        setattr(parent, child, base)
    inj.layers.clear()
    # inject_adapter_in_model leaves its config on the model; without it the next run's injection warns
    # "Already found a peft_config attribute" and the model no longer looks like the base it is again.
    if hasattr(inj.model, "peft_config"):
        del inj.model.peft_config


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not is_adapter_parameter(n))
