"""Where and in what precision the analysis computes: the spec keys `device` and `dtype` as torch objects."""

import torch

from pico.analysis.spec import DTYPES, SpecError, check_device


def compute_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype of the spec keys `device` and `dtype` (auto: a GPU in float32 when
    torch sees one, else the CPU in float64)."""
    check_device(device, dtype)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"device: {device} asked for, but torch sees no CUDA GPU")
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:  # as tensors report it: devices compare equal
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved, DTYPES[dtype] or (torch.float64 if resolved.type == "cpu" else torch.float32)
