"""Where ``LoraMixer`` keeps W0, the weights it writes over, so that every apply starts from them and
``restore()`` puts them back bit for bit.

W0 stays on the weight's own device when there is room: the parameter's tensor itself is kept and the
parameter gets fresh storage to be written into, so nothing is copied (~0.5 GB for SD 1.5 attention in fp32)
and on a GPU nothing crosses the bus. That is always so on the CPU; on CUDA only while a second copy of the
touched weights still leaves a working reserve free for rendering (``originals_fit_on_device``). Otherwise W0
is copied to CPU memory, GPU memory holds only the live weights, and each apply uploads W0 again (the cost of
that round trip is in bench/RESULTS.md).
"""

from __future__ import annotations

import torch

# GPU memory that keeping W0 on the device must leave free, for rendering (the larger of the two)
DEVICE_RESERVE_BYTES = 3 * 2**30
DEVICE_RESERVE_FRACTION = 0.25


def originals_fit_on_device(device: torch.device, nbytes: int) -> bool:
    """Whether ``nbytes`` of kept originals can stay on ``device``: always on the CPU; on CUDA when the memory
    free to PyTorch (the driver's free memory plus what PyTorch holds cached but unused) minus ``nbytes`` still
    leaves ``DEVICE_RESERVE_BYTES`` or ``DEVICE_RESERVE_FRACTION`` of the card, whichever is larger; never on
    other devices (their free memory cannot be asked)."""
    if device.type == "cpu":
        return True
    if device.type != "cuda":
        return False
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free - nbytes >= max(DEVICE_RESERVE_BYTES, DEVICE_RESERVE_FRACTION * total)


def keep_in_place(params: list[torch.nn.Parameter], option: bool | None) -> dict[torch.device, bool]:
    """For each device among ``params``: whether their originals stay on it. The CPU always keeps them in
    place; other devices as ``option`` says (True/False), or, for None, if ``originals_fit_on_device`` for all
    of that device's bytes together."""
    need: dict[torch.device, int] = {}
    for p in params:
        need[p.device] = need.get(p.device, 0) + p.numel() * p.element_size()
    return {dev: dev.type == "cpu" or (option if option is not None else originals_fit_on_device(dev, n))
            for dev, n in need.items()}


def keep_original(param: torch.nn.Parameter, in_place: bool) -> torch.Tensor:
    """Keep W0 before a weight is first written: the parameter's own tensor (it gets fresh storage, which the
    mixer writes, or ``put_back`` returns the original if writing fails first), or a copy in CPU memory."""
    if not in_place:
        return param.detach().to("cpu", copy=True)
    original = param.data
    param.data = torch.empty_like(original)
    return original


def put_back(param: torch.nn.Parameter, w0: torch.Tensor) -> None:
    if param.device == w0.device and param.dtype == w0.dtype and param.shape == w0.shape:
        param.data = w0  # kept in place: the tensor itself goes back, no copy
    else:
        param.copy_(w0)
