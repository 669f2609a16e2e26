"""The network a run trains (``TrainConfig.network``) as objects: LoRA/LoCon, LoHa and LoKr.

Each one builds its peft config (peft's own ``LoraConfig``, ``LoHaConfig``, ``LoKrConfig`` do the layers, inits
and scaling), turns one trained peft layer into the file's ``LoraModule`` and names itself in the metadata
(``ss_network_module``, LyCORIS's ``algo``). The file follows LyCORIS's layout, which A1111, ComfyUI and the
project's reader (``lora.kinds``) load:

* LoHa: peft's ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in), ... are LyCORIS's tensors as they are (and
  ``hada_t1``/``hada_t2`` with LyCORIS's (r, out)/(r, in) factors for Tucker convs); the scale peft applies,
  ``alpha / r``, is the file's alpha over the rows of ``hada_w1_b``.
* LoKr: ``lokr_w1`` or ``lokr_w1_a``/``_b``, ``lokr_w2`` or ``lokr_w2_a``/``_b`` (+ ``lokr_t2``). peft always
  scales by ``alpha / r``; readers do only when a factor is factored (r = rows of its ``_b``). When both factors
  are whole, peft's scale is folded into ``lokr_w1`` and the file's alpha is r (LyCORIS writes the same).
"""

from __future__ import annotations

import torch
from torch import nn

from ..lora.formats import LoraModule
from ..lora.kinds import kind_of
from .config import TrainConfig

ADAPTER = "default"
# Names of trainable adapter parameters, as peft's layers call them.
PARAM_MARKERS = ("lora_", "hada_", "lokr_")


def is_adapter_parameter(name: str) -> bool:
    return any(m in name for m in PARAM_MARKERS)


def _conv_patterns(model: nn.Module, targets: list[str], cfg: TrainConfig) -> tuple[dict, dict]:
    """peft ``rank_pattern``/``alpha_pattern`` giving conv targets ``conv_rank``/``conv_alpha`` (0: rank/alpha)."""
    import re

    if not (cfg.conv_rank or cfg.conv_alpha):
        return {}, {}
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
             and any(n == t or n.endswith("." + t) for t in targets)]
    ranks = {f"^{re.escape(n)}$": cfg.conv_rank for n in convs} if cfg.conv_rank else {}
    alphas = {f"^{re.escape(n)}$": cfg.conv_alpha for n in convs} if cfg.conv_alpha else {}
    return ranks, alphas


class Network:
    """One ``network`` choice: its peft config, its export and its metadata names."""

    name = ""
    module = "lycoris.kohya"                 # ss_network_module
    tuner = ""                               # the peft config class

    def peft_config(self, cfg: TrainConfig, targets: list[str], model: nn.Module):
        import peft

        ranks, alphas = _conv_patterns(model, targets, cfg)
        return getattr(peft, self.tuner)(r=cfg.rank, alpha=cfg.alpha, target_modules=list(targets),
                                         rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout,
                                         use_effective_conv2d=cfg.use_tucker, rank_pattern=ranks,
                                         alpha_pattern=alphas, **self.extra(cfg))

    def extra(self, cfg: TrainConfig) -> dict:
        return {}

    def export(self, layer: nn.Module, kohya: str, dtype: torch.dtype) -> LoraModule:
        raise NotImplementedError

    def network_args(self, cfg: TrainConfig) -> dict[str, str]:
        """LyCORIS's ``network_args`` (strings, as kohya stores the ``--network_args`` it was given)."""
        return {"algo": self.name, "conv_dim": str(cfg.conv_rank or cfg.rank),
                "conv_alpha": str(cfg.conv_alpha or cfg.alpha), "use_tucker": str(cfg.use_tucker),
                "rank_dropout": str(cfg.rank_dropout), "module_dropout": str(cfg.module_dropout)}


class LoraNetwork(Network):
    """Plain LoRA (``networks.lora``); conv targets become LoCon modules. Exported by ``adapters``."""

    name, module, tuner = "lora", "networks.lora", "LoraConfig"

    def peft_config(self, cfg: TrainConfig, targets: list[str], model: nn.Module):
        from peft import LoraConfig

        ranks, alphas = _conv_patterns(model, targets, cfg)
        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(targets),
                          lora_dropout=cfg.lora_dropout, init_lora_weights="pissa" if cfg.init == "pissa" else "gaussian",
                          use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, rank_pattern=ranks, alpha_pattern=alphas)

    def network_args(self, cfg: TrainConfig) -> dict[str, str]:
        return {"conv_dim": str(cfg.conv_rank or cfg.rank), "conv_alpha": str(cfg.conv_alpha or cfg.alpha)}


class LoconNetwork(LoraNetwork):
    """The same peft LoRA layers, named as LyCORIS's LoCon (``lycoris.kohya``, algo ``locon``)."""

    name, module = "locon", "lycoris.kohya"

    def network_args(self, cfg: TrainConfig) -> dict[str, str]:
        return {"algo": "locon", **super().network_args(cfg)}


class LohaNetwork(Network):
    name, tuner = "loha", "LoHaConfig"

    def export(self, layer: nn.Module, kohya: str, dtype: torch.dtype) -> LoraModule:
        ts = {s: getattr(layer, s)[ADAPTER].detach().float().to(dtype) for s in layer.adapter_layer_names
              if ADAPTER in getattr(layer, s)}
        rank = int(ts["hada_w1_b"].shape[0])
        return LoraModule(kohya, "loha", ts, float(layer.scaling[ADAPTER]) * rank, rank)


class LokrNetwork(Network):
    name, tuner = "lokr", "LoKrConfig"

    def extra(self, cfg: TrainConfig) -> dict:
        return {"decompose_both": cfg.decompose_both, "decompose_factor": cfg.lokr_factor}

    def export(self, layer: nn.Module, kohya: str, dtype: torch.dtype) -> LoraModule:
        ts = {s: getattr(layer, s)[ADAPTER].detach().float() for s in layer.adapter_layer_names
              if ADAPTER in getattr(layer, s)}
        scaling, r = float(layer.scaling[ADAPTER]), int(layer.r[ADAPTER])
        rank = kind_of("lokr").rank(ts)          # the rank a reader divides alpha by (0: both factors whole)
        if rank:
            alpha = scaling * rank
        else:                                    # readers apply no scale to two whole factors: fold peft's in
            ts["lokr_w1"] = ts["lokr_w1"] * scaling
            alpha = float(r)
        return LoraModule(kohya, "lokr", {k: t.to(dtype) for k, t in ts.items()}, alpha, rank)

    def network_args(self, cfg: TrainConfig) -> dict[str, str]:
        return {**super().network_args(cfg), "factor": str(cfg.lokr_factor),
                "decompose_both": str(cfg.decompose_both)}


NETWORKS: dict[str, Network] = {n.name: n for n in (LoraNetwork(), LoconNetwork(), LohaNetwork(), LokrNetwork())}


def network_of(cfg: TrainConfig) -> Network:
    return NETWORKS[cfg.network]
