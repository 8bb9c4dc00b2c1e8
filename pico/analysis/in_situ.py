"""In-situ metrics: scalars of the tensors captured at a checkpoint step, logged to tensorboard while
training."""

import torch

from pico.config_loader import ConfigError
from pico.learning_dynamics import SplitDynamics
from pico.metrics import METRICS


def in_situ_scalars(
    dynamics: dict[str, SplitDynamics], weights: dict[str, torch.Tensor] | None, metrics: list[str]
) -> dict[str, float]:
    """Each single-input metric on each captured tensor of the data types it suits (its
    `register_metric(data_types=...)`), tagged `dynamics/<metric>/<split>/<data_type>/<module>`.

    Weights are tagged under the train split. Comparative or unknown metrics raise a ConfigError (load_config
    has refused them already).
    """
    for name in metrics:
        if name not in METRICS:
            known = ", ".join(sorted(METRICS))
            raise ConfigError(f"learning_dynamics.metrics: unknown metric {name!r}; registered: {known}")
        if METRICS[name].comparative:
            raise ConfigError(
                f"learning_dynamics.metrics: {name!r} compares two tensors; in-situ metrics take one"
            )
    chosen = [METRICS[name] for name in metrics]
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
