"""The learning-dynamics files of a checkpoint step: what one split captured, its checks, writing and reading.

Format (docs/checkpoints.md): `learning_dynamics/<split>.safetensors` holds `activations.<module>`,
`gradients.<module>` and `input_ids` for the train and eval splits (the eval split also `losses`);
`weights.safetensors` holds `weights.<module>`. Metadata records step, split, positions, dtype, world size
and the pico version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

import pico
from pico.distributed import is_main, world_size
from pico.model.hf import save_safetensors
from pico.run_dir import LOSSES, SPLITS, RunDirError, dynamics_file, tensor_key

POSITIONS = ("last", "all")
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}  # name -> torch dtype
STORED_DTYPES = ("float32", "bfloat16")  # what learning_dynamics.dtype may store


@dataclass
class SplitDynamics:
    """What one split captured on W_N: activations (N, out) or (N·T, out), gradients (out, in),
    input_ids (N, T+1), and optionally losses (N, T): the per-token cross-entropy of those rows."""

    activations: dict[str, torch.Tensor]
    gradients: dict[str, torch.Tensor]
    input_ids: torch.Tensor
    losses: torch.Tensor | None = None

    def check(self, split: str, positions: str) -> None:
        """Raise a one-line ValueError naming the tensor whose shape does not fit the format."""
        ids = self.input_ids
        if ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(
                f"{split} input_ids must be an integer tensor (N, T+1) or (N, T), "
                f"got {ids.dtype} {tuple(ids.shape)}"
            )
        n, length = ids.shape
        allowed = {n} if positions == "last" else {n * length, n * (length - 1)}
        for name, t in self.activations.items():
            if t.dim() != 2 or t.shape[0] not in allowed:
                raise ValueError(
                    f"activations.{name} has shape {tuple(t.shape)}; with input_ids {tuple(ids.shape)} "
                    f"and positions={positions!r} it needs {sorted(allowed)} rows"
                )
        check_matrices("gradients", self.gradients)
        if self.losses is not None and tuple(self.losses.shape) != (n, length - 1):
            raise ValueError(
                f"{split} losses must be (N, T) = {(n, length - 1)} for input_ids {tuple(ids.shape)}, "
                f"got {tuple(self.losses.shape)}"
            )


def check_matrices(data_type: str, tensors: dict[str, torch.Tensor]) -> None:
    """Gradients and weights are (out_features, in_features) matrices."""
    for name, t in tensors.items():
        if t.dim() != 2:
            raise ValueError(f"{data_type}.{name} must be (out_features, in_features), got {tuple(t.shape)}")


def write_learning_dynamics(
    step_path,
    splits: dict[str, SplitDynamics],
    weights: dict[str, torch.Tensor] | None,
    *,
    step: int,
    positions: str = "last",
    dtype: str = "float32",
) -> list[Path]:
    """Write `<split>.safetensors` per split and `weights.safetensors` into `step_path/learning_dynamics/`
    (`learning_dynamics_files`). Only rank 0 writes; returns the paths written ([] on other ranks)."""
    files = learning_dynamics_files(splits, weights, step=step, positions=positions, dtype=dtype)
    paths = []
    for name, (tensors, metadata) in files.items():
        path = dynamics_file(step_path, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(tensors, path, metadata=metadata)
        paths.append(path)
    return paths


def learning_dynamics_files(
    splits: dict[str, SplitDynamics],
    weights: dict[str, torch.Tensor] | None,
    *,
    step: int,
    positions: str = "last",
    dtype: str = "float32",
) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """{name (a split, or "weights"): (tensors, metadata)} of the learning-dynamics safetensors files of step
    `step`.

    Float tensors are stored as `dtype` ("float32" or "bfloat16"), input_ids as int32; the metadata records
    the world size of the writing run. Every rank checks the shapes; only rank 0 gets the files ({} on
    others).
    """
    if dtype not in STORED_DTYPES:
        raise ValueError(f"learning_dynamics.dtype={dtype!r} is not one of {list(STORED_DTYPES)}")
    if positions not in POSITIONS:
        raise ValueError(f"learning_dynamics.positions={positions!r} is not one of {POSITIONS}")
    for split, captured in splits.items():
        if split not in SPLITS:
            raise ValueError(f"learning dynamics split must be one of {SPLITS}, got {split!r}")
        captured.check(split, positions)
    check_matrices("weights", weights or {})
    if not is_main():
        return {}

    def stored(t):
        return t.detach().to("cpu", DTYPES[dtype]).contiguous()

    files = {}  # file name -> {key: tensor}
    for split, captured in splits.items():
        files[split] = {
            tensor_key(kind, name): stored(t)
            for kind, tensors in (("activations", captured.activations), ("gradients", captured.gradients))
            for name, t in tensors.items()
        }
        files[split]["input_ids"] = (
            captured.input_ids.detach().to("cpu", torch.int32).contiguous()
        )  # (N, T+1)
        if captured.losses is not None:  # float32 whatever `dtype`: small, and compared across steps
            files[split][LOSSES] = captured.losses.detach().to("cpu", torch.float32).contiguous()  # (N, T)
    if weights:
        files["weights"] = {tensor_key("weights", name): stored(t) for name, t in weights.items()}

    def metadata(name):  # "split" is the file's name: train, eval or weights
        return {
            "step": str(step),
            "split": name,
            "positions": positions,
            "dtype": dtype,
            "world_size": str(world_size()),
            "pico_version": pico.__version__,
        }

    return {name: (tensors, metadata(name)) for name, tensors in files.items()}


def open_dynamics(path: Path, device: str = "cpu"):
    """A lazy safetensors handle on a learning-dynamics file; a missing or unreadable file is a RunDirError
    naming it."""
    if not path.is_file():
        raise RunDirError(f"{path}: missing")
    try:
        return safe_open(path, framework="pt", device=device)
    except Exception as e:  # safetensors raises its own error types without the path
        raise RunDirError(f"{path}: not a readable safetensors file ({e})") from None
