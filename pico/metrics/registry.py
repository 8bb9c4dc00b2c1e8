"""Metric registry: `@register_metric(name)` adds a metric, `get_metric(name)` finds it, `METRICS` has all."""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from pico.errors import ConfigError
from pico.run_dir import DATA_TYPES


@dataclass(frozen=True)
class Metric:
    """A registered metric: the function, whether it compares two tensors, and the data types it suits."""

    name: str
    fn: Callable[..., float]
    comparative: bool
    data_types: tuple[str, ...]

    def __call__(self, *args, **kwargs) -> float:
        return self.fn(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.fn)

    @property
    def params(self) -> tuple[str, ...]:
        """Keyword parameters a spec may set (everything after the tensor inputs, except `dtype` and `sv`)."""
        names = list(inspect.signature(self.fn).parameters)[2 if self.comparative else 1 :]
        return tuple(name for name in names if name not in ("dtype", "sv"))

    @property
    def takes_sv(self) -> bool:
        """Whether the metric accepts precomputed singular values as `sv=` (see `singular_values`)."""
        return "sv" in inspect.signature(self.fn).parameters


METRICS: dict[str, Metric] = {}


def register_metric(name: str, *, comparative: bool = False, data_types=DATA_TYPES):
    """Decorator registering `fn(x[, y], **params) -> float` under `name`."""
    unknown = set(data_types) - set(DATA_TYPES)
    if unknown:
        raise ValueError(f"register_metric({name!r}): unknown data types {sorted(unknown)}; use {DATA_TYPES}")

    def decorator(fn):
        if name in METRICS:
            raise ValueError(f"metric {name!r} is already registered (by {METRICS[name].fn.__module__})")
        METRICS[name] = Metric(name, fn, comparative, tuple(data_types))
        return fn

    return decorator


def get_metric(name: str) -> Metric:
    """The registered metric called `name`; a ConfigError listing the known names otherwise."""
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r}; registered: {', '.join(sorted(METRICS))}")
    return METRICS[name]
