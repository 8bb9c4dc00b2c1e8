"""Learning-dynamics analysis: metrics × components × checkpoints → a tidy table, tensorboard scalars, plots.

    spec = load_spec("recipes/configs/analyze_ov.yaml", ["steps=[0,1000]"])   # or parse_spec({...})
    rows = analyze(["runs/tiny"], spec)        # list[Row], the tidy table
    save(rows, ["runs/tiny"], spec, plot=True)  # runs/tiny/analysis/<name>/{metrics.csv, tensorboard/, plots/}

Reads the run directory of contract 3 (`checkpoints/step_<N>/learning_dynamics/*.safetensors`). Every
checkpoint is opened once and read lazily: only the tensors a metric asks for, each at most once, straight
onto the compute device. The spec keys and output format are documented in docs/analysis.md.
"""

from pico.analysis.checkpoints import Checkpoint, discover_steps
from pico.analysis.compute import Row, analyze, run_names
from pico.analysis.output import COLUMNS, plot_rows, read_csv, save, scalar_tag, write_csv, write_tensorboard
from pico.analysis.spec import (COMPARE, DEFAULT_SPEC, DTYPES, SPLITS, AnalysisSpec, ComponentSpec, MetricSpec,
                                SpecError, load_spec, parse_spec)

__all__ = ["AnalysisSpec", "COLUMNS", "COMPARE", "Checkpoint", "ComponentSpec", "DEFAULT_SPEC", "DTYPES",
           "MetricSpec", "Row", "SPLITS", "SpecError", "analyze", "discover_steps", "load_spec", "parse_spec",
           "plot_rows", "read_csv", "run_names", "save", "scalar_tag", "write_csv", "write_tensorboard"]
