"""Run directories: the steps that hold learning dynamics, and one checkpoint's tensors read lazily."""

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from pico.analysis.spec import ComponentSpec
from pico.components import COMPONENTS, matches

_LAYER = re.compile(r"^layers\.(\d+)\.")


def discover_steps(run_dir) -> list[int]:
    """Steps N of `<run_dir>/checkpoints/step_<N>/` that hold `learning_dynamics/`, ascending."""
    checkpoints = Path(run_dir) / "checkpoints"
    if not checkpoints.is_dir():
        raise ValueError(f"{run_dir}: not a run directory (no checkpoints/ folder)")
    steps = sorted(int(m.group(1)) for p in checkpoints.iterdir()
                   if (m := re.fullmatch(r"step_(\d+)", p.name)) and (p / "learning_dynamics").is_dir())
    if not steps:
        raise ValueError(f"{checkpoints}: no step_<N>/learning_dynamics/ folders")
    return steps


class Checkpoint:
    """One checkpoint's learning dynamics, read lazily: files opened once, each tensor read at most once."""

    def __init__(self, run_dir, step: int, device: torch.device, dtype: torch.dtype):
        self.step, self.device, self.dtype = step, device, dtype
        self.dir = Path(run_dir) / "checkpoints" / f"step_{step}"
        self._files, self._tensors, self._derived, self._config = {}, {}, {}, None

    def _file(self, name: str):
        if name not in self._files:
            path = self.dir / "learning_dynamics" / f"{name}.safetensors"
            if not path.is_file():
                raise ValueError(f"{path}: missing")
            self._files[name] = safe_open(path, framework="pt", device=str(self.device))
        return self._files[name]

    def modules(self, data_type: str, split: str | None) -> list[str]:
        """Full module names that have `data_type` tensors (in `split`'s file, or weights.safetensors)."""
        prefix = data_type + "."
        return [k[len(prefix):] for k in self._file(split or "weights").keys() if k.startswith(prefix)]

    def load(self, data_type: str, module: str, split: str | None = None) -> torch.Tensor:
        """Tensor `<data_type>.<module>` on the compute device and dtype (weights ignore `split`)."""
        file = "weights" if data_type == "weights" else split
        key = f"{data_type}.{module}"
        if (file, key) not in self._tensors:
            handle = self._file(file)
            if key not in handle.keys():
                raise ValueError(f"{self.dir}/learning_dynamics/{file}.safetensors: no tensor {key!r}")
            self._tensors[file, key] = handle.get_tensor(key).to(self.dtype)
        return self._tensors[file, key]

    def input_ids(self, split: str) -> torch.Tensor | None:
        """The split's input_ids, or None when the file has none."""
        if (split, "input_ids") not in self._tensors:
            handle = self._file(split)
            self._tensors[split, "input_ids"] = handle.get_tensor("input_ids") if "input_ids" in handle.keys() else None
        return self._tensors[split, "input_ids"]

    @property
    def model_config(self) -> dict:
        """The HF config.json of `step_<N>/model/`."""
        if self._config is None:
            path = self.dir / "model" / "config.json"
            if not path.is_file():
                raise ValueError(f"{path}: missing (compound components read n_heads from it)")
            self._config = json.loads(path.read_text())
        return self._config

    def component(self, name: str, layer: int, data_type: str, split: str | None) -> torch.Tensor:
        """Compound component `name` at `layer`, computed once per checkpoint."""
        key = (name, layer, data_type, split)
        if key not in self._derived:
            self._derived[key] = COMPONENTS[name].fn(_SplitSource(self, split), layer, data_type)
        return self._derived[key]


class _SplitSource:
    """A checkpoint seen through one split: what compound components read from."""

    def __init__(self, checkpoint: Checkpoint, split: str | None):
        self.checkpoint, self.split = checkpoint, split

    def load(self, data_type: str, module: str) -> torch.Tensor:
        """The checkpoint's `data_type` tensor of `module`, from this split."""
        return self.checkpoint.load(data_type, module, self.split)

    @property
    def model_config(self) -> dict:
        """The checkpoint's HF `config.json` as a dict."""
        return self.checkpoint.model_config


def _suffix(module: str) -> str:
    return _LAYER.sub("", module)


def _layer(module: str) -> int | None:
    m = _LAYER.match(module)
    return int(m.group(1)) if m else None


def _selections(ckpt: Checkpoint, comp: ComponentSpec, data_type: str, split: str | None):
    """(layer, module) pairs for a simple component, (layer, None) for a compound one, sorted by layer."""
    if comp.name in COMPONENTS:
        weights = set(ckpt.modules("weights", None))
        found = sorted(int(m.group(1)) for module in weights if (m := _LAYER.match(module))
                       and all(f"layers.{m.group(1)}.{s}" in weights for s in COMPONENTS[comp.name].modules))
        pairs = [(layer, None) for layer in dict.fromkeys(found)]
    else:
        pairs = sorted(((_layer(m), m) for m in ckpt.modules(data_type, split) if matches(m, comp.name)),
                       key=lambda p: -1 if p[0] is None else p[0])
    if not pairs:
        raise ValueError(f"{ckpt.dir}: no captured {data_type} for component {comp.name!r}")
    if comp.layers is None:
        return pairs
    missing = set(comp.layers) - {layer for layer, _ in pairs}
    if missing:
        raise ValueError(f"{ckpt.dir}: component {comp.name!r} has no layer {min(missing)} "
                         f"(captured layers: {[layer for layer, _ in pairs]})")
    return [p for p in pairs if p[0] in comp.layers]
