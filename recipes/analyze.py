r"""Analyze learning dynamics of one or more run directories (docs/analysis.md).

    python recipes/analyze.py --run runs/tiny                                  # the default analysis
    python recipes/analyze.py --run runs/tiny --config recipes/configs/analyze.yaml --plot
    python recipes/analyze.py --run runs/tiny --run runs/small \
        metrics=[cka] compare=runs data_types=[activations]
    python recipes/analyze.py --run runs/tiny --plot evals=[blimp/acc] \
        metrics=[condition_number] data_types=[gradients] components=[attention.v_proj]
    python recipes/analyze.py --hub pico-lm/pico-decoder-tiny --revision pico-decoder-tiny-1   # docs/hub.md
    python recipes/analyze.py --model runs/tiny/checkpoints/step_0/model --model ORG/NAME@step1000 \
        --eval-data data/eval --eval-batch-size 64 --output runs/suite    # re-captured (docs/analysis.md)
    python recipes/analyze.py --plot --group base='runs/base-*' --group relora='runs/relora-*'   # seeds

Overrides `key=value` set top-level spec keys (values are YAML). Writes `<run>/analysis/<name>/`:
metrics.csv, tensorboard/ and, with --plot, plots/*.png (with several runs also plots/runs/*.png in the
first run's folder: one line per run); with groups of runs, also groups.csv (each group's mean and 95%
Student-t interval) and plots/groups/ there. Bad input exits with code 2 and one line `<kind>: <message>`.
"""

import argparse
from pathlib import Path

from pico.analysis import (
    AnalysisError,
    SpecError,
    analyze,
    compute_device,
    group_runs,
    load_spec,
    save,
    with_groups,
)
from pico.analysis.recapture import check_eval_only, parse_steps, recapture, spec_layers
from pico.analysis.sources import analysis_runs
from pico.errors import exit_on


def recaptured_run(args, spec) -> Path:
    """The run directory `--output` holding the learning dynamics of each `--model`, re-captured."""
    if not (args.model and args.eval_data and args.output):
        raise AnalysisError("--model, --eval-data and --output go together")
    check_eval_only(spec)
    return recapture(
        args.model,
        eval_data=args.eval_data,
        output=args.output,
        eval_batch_size=args.eval_batch_size,
        steps=parse_steps(args.steps),
        layers=spec_layers(spec),
        device=compute_device(spec.device, spec.dtype)[0],
    )


@exit_on()  # bad input (the spec, a run, a file in it, the Hub): one line `<kind>: <message>`, exit 2
def main(argv=None):
    """Parse the command line, run the analysis, write its outputs; exit 2 on bad input."""
    parser = argparse.ArgumentParser(
        description="Metrics × components × checkpoints of pico run directories."
    )
    parser.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="DIR",
        help="run directory, pico or pico-train (repeatable)",
    )
    parser.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="NAME=GLOB",
        help="a group of runs, the directories GLOB matches (repeatable): groups.csv, mean and 95%% interval",
    )
    parser.add_argument("--hub", action="append", default=[], metavar="REPO_ID", help="a run on the Hub")
    parser.add_argument("--revision", help="the --hub run's branch (default: main)")
    parser.add_argument(
        "--config", metavar="FILE", help="analysis spec (YAML); default: the default analysis"
    )
    parser.add_argument("--plot", action="store_true", help="also write PNG plots (needs matplotlib)")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="M",
        help="an HF model dir or repo_id@revision: re-capture its learning dynamics (repeatable)",
    )
    parser.add_argument("--eval-data", metavar="P", help="--model: pretokenized parquet, its first rows")
    parser.add_argument("--eval-batch-size", type=int, default=64, metavar="N", help="--model: rows")
    parser.add_argument("--steps", metavar="0,1000,...", help="--model: each model's step")
    parser.add_argument("--output", metavar="DIR", help="--model: the run directory written")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="spec overrides, e.g. steps=[0,1000]"
    )
    args = parser.parse_args(argv)
    for arg in args.overrides:  # `analyze.py runs/demo`: a run typed where the overrides go
        if "=" not in arg and Path(arg).expanduser().is_dir():
            raise SpecError(f"{arg}: a directory where overrides (key=value) go; to analyze it: --run {arg}")

    eval_only = ["splits=[eval]"] if args.model and args.config is None else []  # all a re-capture has
    spec = with_groups(load_spec(args.config, eval_only + args.overrides), args.group)
    groups = group_runs(spec.groups)  # name -> the run directories its glob matches
    given = {Path(run).resolve() for run in args.run}  # a run given by --run and a group is read once
    runs = [*args.run, *(run for name in groups for run in groups[name] if run.resolve() not in given)]
    # every run as a local folder in pico's layout (a pico-train run converted, a Hub run downloaded)
    read, write = analysis_runs(spec, runs=runs, hub_repos=args.hub, revision=args.revision)
    if args.model or args.eval_data or args.output or args.steps:  # HF checkpoints, re-captured into a run
        out = recaptured_run(args, spec)
        read, write = [*read, out], [*write, out]
    rows = analyze(read, spec)
    written = save(rows, write, spec, plot=args.plot, groups=groups)
    pngs = [p for p in written if str(p).endswith(".png")]
    print(f"{len(rows)} values; wrote:")
    for path in written:
        if path not in pngs:
            print(f"  {path}")
    for folder in sorted({p.parent for p in map(Path, pngs)}):
        print(f"  {folder}/ ({sum(Path(p).parent == folder for p in pngs)} plots)")


if __name__ == "__main__":
    main()
