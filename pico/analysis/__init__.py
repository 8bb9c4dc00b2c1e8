"""Learning-dynamics analysis: metrics × components × checkpoints → a tidy table, tensorboard scalars, plots.

    spec = load_spec("recipes/configs/analyze_ov.yaml", ["steps=[0,1000]"])   # or parse_spec({...})
    rows = analyze(["runs/tiny"], spec)        # Rows of Row, the tidy table; rows.to_frame() for pandas
    save(rows, ["runs/tiny"], spec, plot=True)  # runs/tiny/analysis/<name>/{metrics.csv,
                                                #   tensorboard/, plots/}
    run = open_run("runs/tiny")                 # one run's tensors and evaluations, for notebooks
    group_rows(rows, {"base": ["base-0", "base-1"]})   # per group: mean and 95% t-interval over its runs

Reads the run directory through pico.run_dir (docs/checkpoints.md); pico.analysis.sources also reads
pico-train runs and runs on the Hub (recipes/analyze.py --run, --hub). Every
checkpoint is opened once and read lazily: only the tensors a metric asks for, each at most once, straight
onto the compute device. The spec keys and output format are documented in docs/analysis.md.
"""

from pico.analysis.checkpoints import Checkpoint
from pico.analysis.compute import analyze, run_names
from pico.analysis.device import compute_device
from pico.analysis.evals import EvalRow, eval_rows, read_evals, select_evals
from pico.analysis.groups import (
    GROUP_COLUMNS,
    GroupRow,
    group_rows,
    group_runs,
    read_groups_csv,
    t_interval,
    write_groups_csv,
)
from pico.analysis.in_situ import in_situ_scalars
from pico.analysis.output import (
    COLUMNS,
    logged_scalars,
    plot_groups,
    plot_loss,
    plot_rows,
    plot_runs,
    read_csv,
    save,
    scalar_tag,
    train_loss,
    write_csv,
    write_tensorboard,
)
from pico.analysis.run import Run, open_run
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
    with_groups,
)
from pico.analysis.student_t import t_ppf, t_sf
from pico.analysis.table import Row, Rows
from pico.errors import AnalysisError

__all__ = [
    "AnalysisError",
    "AnalysisSpec",
    "COLUMNS",
    "COMPARE",
    "Checkpoint",
    "ComponentSpec",
    "DEFAULT_SPEC",
    "DTYPES",
    "MetricSpec",
    "EvalRow",
    "GROUP_COLUMNS",
    "GroupRow",
    "Row",
    "Rows",
    "Run",
    "SPLITS",
    "SpecError",
    "analyze",
    "compute_device",
    "eval_rows",
    "group_rows",
    "group_runs",
    "in_situ_scalars",
    "load_spec",
    "logged_scalars",
    "open_run",
    "parse_spec",
    "plot_loss",
    "plot_groups",
    "plot_rows",
    "plot_runs",
    "read_csv",
    "read_evals",
    "read_groups_csv",
    "run_names",
    "save",
    "scalar_tag",
    "select_evals",
    "train_loss",
    "t_interval",
    "t_ppf",
    "t_sf",
    "with_groups",
    "write_csv",
    "write_groups_csv",
    "write_tensorboard",
]
