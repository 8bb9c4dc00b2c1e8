"""Turn metric inputs (torch tensors or numpy arrays, any float dtype, any device) into checked float tensors."""

import numpy as np
import torch


def as_tensor(x, metric: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A detached, non-empty floating tensor on `x`'s device: float64 on CPU, float32 elsewhere, or `dtype`."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        raise ValueError(f"{metric}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if x.is_complex():
        raise ValueError(f"{metric}: complex input of shape {tuple(x.shape)} is not supported")
    if x.numel() == 0:
        raise ValueError(f"{metric}: empty input of shape {tuple(x.shape)}")
    if dtype is None:
        dtype = torch.float64 if x.device.type == "cpu" else torch.float32
    return x.detach().to(dtype)


def as_matrix(x, metric: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`as_tensor`, also requiring a 2-D matrix."""
    x = as_tensor(x, metric, dtype)
    if x.dim() != 2:
        raise ValueError(f"{metric}: expected a 2-D matrix, got shape {tuple(x.shape)}")
    return x


def as_pair(x, y, metric: str, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (samples, features) matrices with the same number of samples, on `x`'s device and dtype."""
    x = as_matrix(x, metric, dtype)
    y = as_matrix(y, metric, x.dtype).to(x.device)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{metric}: x and y need the same number of samples (rows), "
                         f"got x {tuple(x.shape)} and y {tuple(y.shape)}")
    return x, y


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every entry of every tensor is finite (no NaN, no ±inf): min and max propagate both."""
    return all(bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()) for t in tensors)
