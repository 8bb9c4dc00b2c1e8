"""One checkpoint's learning dynamics, read lazily through pico.run_dir's layout and key format.

Everything derived from a checkpoint is computed once and kept while the Checkpoint lives: the tensors read,
compound components, and the singular values that every spectral metric of the analysis shares. A step may
lack a split (pico-train's final step has no train split); a file's metadata may refuse a data type
(`refused.<data_type>`: the reason) and say what its gradients are (`gradients`, default BATCH_MEAN).
"""

import json

import torch

from pico.components import get_component
from pico.errors import AnalysisError
from pico.learning_dynamics import open_dynamics
from pico.manifest import verify_files
from pico.metrics import SingularValues, singular_values
from pico.run_dir import LOSSES, dynamics_file, model_config_file, parse_key, step_dir, tensor_key

BATCH_MEAN = "batch mean"  # what gradients are unless a file's `gradients` metadata says otherwise


class Checkpoint:
    """One checkpoint's learning dynamics, read lazily: files opened once (and verified against the step's
    manifest first, when it has one), each tensor read at most once."""

    def __init__(self, run_dir, step: int, device: torch.device, dtype: torch.dtype):
        self.step, self.device, self.dtype = step, device, dtype
        self.dir = step_dir(run_dir, step)
        self._files, self._keys, self._tensors, self._derived, self._spectra = {}, {}, {}, {}, {}
        self._config = None

    def _file(self, name: str):
        if name not in self._files:
            path = dynamics_file(self.dir, name)
            if not path.is_file():
                raise AnalysisError(f"{path}: missing (step {self.step} has no {name} split)")
            verify_files(self.dir, [path.relative_to(self.dir).as_posix()])
            self._files[name] = open_dynamics(path, str(self.device))
        return self._files[name]

    def has(self, split: str | None) -> bool:
        """Whether the step has `split`'s file (weights.safetensors for None)."""
        return dynamics_file(self.dir, split or "weights").is_file()

    def metadata(self, split: str | None) -> dict[str, str]:
        """The safetensors metadata of `split`'s file (weights.safetensors for None)."""
        return self._file(split or "weights").metadata() or {}

    def refused(self, data_type: str, split: str | None) -> str | None:
        """Why `data_type` of `split` must not be analysed (its file's `refused.<data_type>`), or None."""
        return self.metadata(split).get(f"refused.{data_type}")

    def gradients_meaning(self, split: str) -> str:
        """What `split`'s gradients are: BATCH_MEAN, or what the file's `gradients` metadata says."""
        return self.metadata(split).get("gradients", BATCH_MEAN)

    def modules(self, data_type: str, split: str | None) -> list[str]:
        """Full module names that have `data_type` tensors (in `split`'s file, or weights.safetensors)."""
        file = split or "weights"
        if file not in self._keys:
            self._keys[file] = [key for k in self._file(file).keys() if (key := parse_key(k)) is not None]
        return [module for kind, module in self._keys[file] if kind == data_type]

    def load(self, data_type: str, module: str, split: str | None = None) -> torch.Tensor:
        """Tensor `<data_type>.<module>` on the compute device and dtype (weights ignore `split`)."""
        file = "weights" if data_type == "weights" else split
        key = tensor_key(data_type, module)
        if (file, key) not in self._tensors:
            handle = self._file(file)
            if reason := self.refused(data_type, file):
                raise AnalysisError(f"{dynamics_file(self.dir, file)}: {data_type} refused: {reason}")
            if key not in handle.keys():
                raise AnalysisError(f"{dynamics_file(self.dir, file)}: no tensor {key!r}")
            self._tensors[file, key] = self._read(handle, file, key).to(self.dtype)
        return self._tensors[file, key]

    def _read(self, handle, file: str, key: str) -> torch.Tensor:
        try:
            return handle.get_tensor(key)
        except Exception as e:  # safetensors' own errors do not name the file
            raise AnalysisError(f"{dynamics_file(self.dir, file)}: cannot read {key!r} ({e})") from None

    def losses(self, split: str) -> torch.Tensor:
        """The split's per-token cross-entropy (N, T) on the compute device and dtype; an AnalysisError when
        its file has none (a train split, or a step written before pico stored them)."""
        if (split, LOSSES) not in self._tensors:
            handle = self._file(split)
            if LOSSES not in handle.keys():
                raise AnalysisError(f"{dynamics_file(self.dir, split)}: no per-token {LOSSES!r}")
            self._tensors[split, LOSSES] = self._read(handle, split, LOSSES).to(self.dtype)
        return self._tensors[split, LOSSES]

    def input_ids(self, split: str) -> torch.Tensor | None:
        """The split's input_ids, or None when the file has none."""
        if (split, "input_ids") not in self._tensors:
            handle = self._file(split)
            self._tensors[split, "input_ids"] = (
                self._read(handle, split, "input_ids") if "input_ids" in handle.keys() else None
            )
        return self._tensors[split, "input_ids"]

    @property
    def model_config(self) -> dict:
        """The HF config.json of `step_<N>/model/`."""
        if self._config is None:
            path = model_config_file(self.dir)
            if not path.is_file():
                raise AnalysisError(f"{path}: missing (compound components read n_heads from it)")
            verify_files(self.dir, [path.relative_to(self.dir).as_posix()])
            self._config = json.loads(path.read_text())
        return self._config

    def component(self, name: str, layer: int, data_type: str, split: str | None) -> torch.Tensor:
        """Compound component `name` at `layer`, computed once per checkpoint."""
        key = (name, layer, data_type, split)
        if key not in self._derived:
            self._derived[key] = get_component(name).fn(_SplitSource(self, split), layer, data_type)
        return self._derived[key]

    def singular_values(self, key: tuple, matrix: torch.Tensor) -> SingularValues:
        """`pico.metrics.singular_values(matrix)` in the compute dtype, computed once per `key`
        (what the matrix is: data type, split, component, layer, module, head)."""
        if key not in self._spectra:
            self._spectra[key] = singular_values(matrix, self.dtype)
        return self._spectra[key]


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
