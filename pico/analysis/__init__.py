"""Learning-dynamics analysis: metrics × components × checkpoints → a tidy table, tensorboard scalars, plots.

    spec = load_spec("recipes/configs/analyze_ov.yaml", ["steps=[0,1000]"])   # or parse_spec({...})
    rows = analyze(["runs/tiny"], spec)        # list[Row], the tidy table
    save(rows, ["runs/tiny"], spec, plot=True)  # runs/tiny/analysis/<name>/{metrics.csv,
                                                #   tensorboard/, plots/}

Reads the run directory through pico.run_dir (docs/checkpoints.md). Every
checkpoint is opened once and read lazily: only the tensors a metric asks for, each at most once, straight
onto the compute device. The spec keys and output format are documented in docs/analysis.md.
"""

from pico.analysis.checkpoints import Checkpoint
from pico.analysis.compute import Row, analyze, run_names
from pico.analysis.in_situ import in_situ_scalars
from pico.analysis.output import COLUMNS, plot_rows, read_csv, save, scalar_tag, write_csv, write_tensorboard
from pico.analysis.spec import (
    COMPARE,
    DEFAULT_SPEC,
    DTYPES,
    SPLITS,
    AnalysisSpec,
    ComponentSpec,
    MetricSpec,
    SpecError,
    load_spec,
    parse_spec,
)

__all__ = [
    "AnalysisSpec",
    "COLUMNS",
    "COMPARE",
    "Checkpoint",
    "ComponentSpec",
    "DEFAULT_SPEC",
    "DTYPES",
    "MetricSpec",
    "Row",
    "SPLITS",
    "SpecError",
    "analyze",
    "in_situ_scalars",
    "load_spec",
    "parse_spec",
    "plot_rows",
    "read_csv",
    "run_names",
    "save",
    "scalar_tag",
    "write_csv",
    "write_tensorboard",
]
