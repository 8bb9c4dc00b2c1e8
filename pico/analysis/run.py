"""A run directory for notebooks: its steps, tensors, compound components and evaluations (docs/analysis.md).

    run = open_run("runs/demo")
    run.steps                                                               # [0, 50, ..., 300]
    run.tensor("gradients", "layers.3.attention.v_proj", step=200, split="eval")
    run.tensor("losses", step=200, split="eval")                           # per-token cross-entropy (N, T)
    run.component("ov_circuit", layer=1, data_type="weights", step=200)     # (n_heads, D, D)
    run.evals()                                                             # list[EvalRow]; .to_frame()

Paths and keys come from pico.run_dir, tensors from pico.analysis.checkpoints.Checkpoint.
"""

from pathlib import Path

import torch

from pico.analysis.checkpoints import Checkpoint
from pico.analysis.device import compute_device
from pico.analysis.evals import eval_rows
from pico.analysis.table import Rows
from pico.components import COMPONENTS
from pico.errors import AnalysisError
from pico.run_dir import DATA_TYPES, LOSSES, SPLITS, list_steps, run_name


class Run:
    """A run directory's learning dynamics and evaluations, read lazily; tensors on `device` in `dtype`."""

    def __init__(self, path, device: str = "auto", dtype: str = "auto"):
        self.path = Path(path)
        self.name = run_name(self.path)
        self.device, self.dtype = compute_device(device, dtype)
        self.steps = list_steps(self.path)  # steps with learning dynamics, ascending
        self._checkpoint = None  # the last step read: its tensors stay loaded until another step is read

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, steps={self.steps})"

    def checkpoint(self, step: int) -> Checkpoint:
        """The Checkpoint of `step`; the one last read is kept, so reading many modules of a step is cheap."""
        if step not in self.steps:
            raise AnalysisError(f"{self.path}: no step {step} with learning_dynamics (steps: {self.steps})")
        if self._checkpoint is None or self._checkpoint.step != step:
            self._checkpoint = Checkpoint(self.path, step, self.device, self.dtype)
        return self._checkpoint

    def _split(self, data_type: str, split: str | None) -> str | None:
        if data_type not in (*DATA_TYPES, LOSSES):
            raise AnalysisError(f"data_type: unknown {data_type!r}; choose from {[*DATA_TYPES, LOSSES]}")
        if data_type == "weights":
            return None
        if split not in SPLITS:
            raise AnalysisError(f"{data_type} need split= one of {list(SPLITS)}, got {split!r}")
        return split

    def modules(self, data_type: str, split: str | None = None, step: int | None = None) -> list[str]:
        """Module names with captured `data_type` tensors at `step` (default: the first), in file order."""
        split = self._split(data_type, split)
        return self.checkpoint(self.steps[0] if step is None else step).modules(data_type, split)

    def tensor(
        self, data_type: str, module: str | None = None, step: int | None = None, split: str | None = None
    ) -> torch.Tensor:
        """The captured `data_type` tensor of `module` (e.g. `layers.3.attention.v_proj`) at `step`;
        activations and gradients come from `split` (train or eval), weights from no split. `losses`, the
        split's per-token cross-entropy (N, T), has no module: `tensor("losses", step=200, split="eval")`."""
        if step is None:
            raise AnalysisError(f"tensor({data_type!r}): needs step= (one of {self.steps})")
        if data_type == LOSSES:
            return self.checkpoint(step).losses(self._split(LOSSES, split))
        split = self._split(data_type, split)
        if module is None:
            raise AnalysisError(
                f"tensor({data_type!r}): needs a module, e.g. {self.modules(data_type, split)[:1]}"
            )
        return self.checkpoint(step).load(data_type, module, split)

    def component(
        self, name: str, layer: int, data_type: str, step: int, split: str | None = None
    ) -> torch.Tensor:
        """Compound component `name` (pico.components, e.g. `ov_circuit`) of `layer` at `step`."""
        if name not in COMPONENTS:
            raise AnalysisError(f"unknown component {name!r}; registered: {', '.join(sorted(COMPONENTS))}")
        component, split = COMPONENTS[name], self._split(data_type, split)
        if data_type not in component.data_types:
            has = ", ".join(component.data_types)
            raise AnalysisError(f"component {name!r} has no {data_type} (it has {has})")
        return self.checkpoint(step).component(name, layer, data_type, split)

    def evals(self) -> Rows:
        """Every step's eval.json as a tidy table of EvalRow(run, step, task, subset, metric, value)."""
        return eval_rows(self.path)


def open_run(path, device: str = "auto", dtype: str = "auto") -> Run:
    """A Run on the run directory `path` (device and dtype as the spec keys: auto, cpu, cuda; float32...)."""
    return Run(path, device, dtype)
