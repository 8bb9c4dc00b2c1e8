"""In-situ metrics: scalars of the tensors captured at a checkpoint step, logged to tensorboard while
training."""

import torch

from pico.errors import ConfigError
from pico.learning_dynamics import SplitDynamics
from pico.metrics import get_metric


def in_situ_scalars(
    dynamics: dict[str, SplitDynamics], weights: dict[str, torch.Tensor] | None, metrics: list[str]
) -> dict[str, float]:
    """Each single-input metric on each captured tensor of the data types it suits (its
    `register_metric(data_types=...)`), tagged `dynamics/<metric>/<split>/<data_type>/<module>`.

    Weights are tagged under the train split. Comparative or unknown metrics raise a one-line ConfigError.
    """
    chosen = [get_metric(name) for name in metrics]
    for metric in chosen:
        if metric.comparative:
            raise ConfigError(
                f"learning_dynamics.metrics: {metric.name!r} compares two tensors; in-situ metrics "
                "take one (per, condition_number, gini, hoyer, norm, ...); compare checkpoints "
                "with pico.analysis"
            )
    tensors = {(split, "activations"): d.activations for split, d in dynamics.items()}
    tensors.update({(split, "gradients"): d.gradients for split, d in dynamics.items()})
    tensors["train", "weights"] = weights or {}
    scalars = {}
    for metric in chosen:
        for (split, data_type), captured in tensors.items():
            if data_type in metric.data_types:
                for module, t in captured.items():
                    scalars[f"dynamics/{metric.name}/{split}/{data_type}/{module}"] = metric(t)
    return scalars
