"""Where the frozen base weights live during training: dtype, device, memory format, and off the GPU once cached.

- ``frozen_dtypes``: with fp16/bf16 mixed precision the frozen UNet, text encoders and VAE are held in that dtype
  (half the memory and no per-op casts, as diffusers' LoRA scripts do with ``weight_dtype``); the LoRA weights
  stay fp32. The SDXL VAE stays fp32 under fp16 (it overflows there, as the diffusers SDXL script notes).
- ``Placement``: applies that, plus a channels-last UNet on CUDA, and puts a pipeline that was passed in back
  exactly as it was (device, dtype, memory format) when training ends.
- ``Offloader``: moves the VAE and frozen text encoders to the CPU once their outputs are cached (CUDA only;
  on the CPU there is nowhere to move them) and brings them back for sample images.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def frozen_dtypes(mixed_precision: str, cast: bool, unet: nn.Module, vae: nn.Module, encoders: Iterable[nn.Module],
                  sdxl: bool) -> dict[nn.Module, torch.dtype | None]:
    """The dtype each frozen model is held in (None: leave it as it is). ``mixed_precision`` is the one the
    accelerator actually uses ("no" for fp16 on a CPU)."""
    half = HALF.get(str(mixed_precision)) if cast else None
    out: dict[nn.Module, torch.dtype | None] = {unet: half}
    out.update({te: half for te in encoders})
    out[vae] = torch.float32 if (half is torch.float16 and sdxl) else half
    return out


def _tensors(module: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor, bool]]:
    """(owner, name, tensor, is_parameter) for every parameter and buffer, each owner visited once."""
    for owner in module.modules():
        for name, p in owner._parameters.items():
            if p is not None:
                yield owner, name, p, True
        for name, b in owner._buffers.items():
            if b is not None:
                yield owner, name, b, False


class Placement:
    """Casts and moves the frozen models for training; ``restore()`` undoes it for a pipeline passed in.

    ``keep_originals``: remember the tensors of every model that changes (CPU tensors by reference, GPU tensors
    copied to the CPU, so the GPU saving is kept), and put them back on ``restore()``. Parameters stay the same
    ``nn.Parameter`` objects throughout (their ``.data`` is swapped), so references held elsewhere stay valid.
    """

    def __init__(self, device: torch.device, keep_originals: bool) -> None:
        self.device = torch.device(device)
        self.keep_originals = keep_originals
        self._originals: list[tuple[nn.Module, str, torch.Tensor, bool, torch.device]] = []

    def place(self, module: nn.Module, dtype: torch.dtype | None, channels_last: bool = False) -> None:
        module.requires_grad_(False)
        changes = any(t.device != self.device or (dtype is not None and t.is_floating_point() and t.dtype != dtype)
                      for _, _, t, _ in _tensors(module))
        if self.keep_originals and (changes or channels_last):
            for owner, name, t, is_param in _tensors(module):
                kept = t.data if t.device.type == "cpu" else t.data.to("cpu", copy=True)
                self._originals.append((owner, name, kept, is_param, t.device))
        module.to(self.device, dtype=dtype) if dtype is not None else module.to(self.device)
        if channels_last:
            module.to(memory_format=torch.channels_last)

    def restore(self) -> None:
        with torch.no_grad():
            for owner, name, kept, is_param, device in self._originals:
                value = kept.to(device)
                if is_param:
                    owner._parameters[name].data = value
                else:
                    owner._buffers[name] = value
        self._originals.clear()


def wants_channels_last(enabled: bool, device: torch.device) -> bool:
    """Channels-last pays on CUDA (tensor-core convolutions); on the CPU it is left alone."""
    return bool(enabled) and torch.device(device).type == "cuda"


class Offloader:
    """Keeps models whose outputs are cached on the CPU while training runs on ``device`` (CUDA only)."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device = torch.device(device)
        self.active = bool(enabled) and self.device.type == "cuda"
        self.models: list[nn.Module] = []

    def offload(self, models: Iterable[nn.Module]) -> list[nn.Module]:
        """Move ``models`` to the CPU (when active); returns those moved."""
        if not self.active:
            return []
        moved = [m for m in models if m is not None and m not in self.models]
        for m in moved:
            m.to("cpu")
        self.models.extend(moved)
        if moved and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return moved

    @contextmanager
    def on_device(self) -> Iterator[None]:
        """The offloaded models back on the training device for a while (sample images)."""
        for m in self.models:
            m.to(self.device)
        try:
            yield
        finally:
            for m in self.models:
                m.to("cpu")

    def restore(self) -> None:
        """Every offloaded model back on the training device (when training ends)."""
        for m in self.models:
            m.to(self.device)
        self.models.clear()
