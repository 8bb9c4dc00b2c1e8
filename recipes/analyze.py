r"""Analyze learning dynamics of one or more run directories (docs/analysis.md).

    python recipes/analyze.py --run runs/tiny                                  # the default analysis
    python recipes/analyze.py --run runs/tiny --config recipes/configs/analyze.yaml --plot
    python recipes/analyze.py --run runs/tiny --run runs/small \
        metrics=[cka] compare=runs data_types=[activations]
    python recipes/analyze.py --run runs/tiny --plot evals=[blimp/acc] \
        metrics=[condition_number] data_types=[gradients] components=[attention.v_proj]
    python recipes/analyze.py --hub pico-lm/pico-decoder-tiny --revision pico-decoder-tiny-1   # docs/hub.md

Overrides `key=value` set top-level spec keys (values are YAML). Writes `<run>/analysis/<name>/`:
metrics.csv, tensorboard/ and, with --plot, plots/*.png (with several runs also plots/runs/*.png in the
first run's folder: one line per run). Bad input exits with code 2 and one line `<kind>: <message>`.
"""

import argparse
from pathlib import Path

from pico.analysis import analyze, load_spec, save
from pico.analysis.sources import analysis_runs
from pico.errors import exit_on


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
    parser.add_argument("--hub", action="append", default=[], metavar="REPO_ID", help="a run on the Hub")
    parser.add_argument("--revision", help="the --hub run's branch (default: main)")
    parser.add_argument(
        "--config", metavar="FILE", help="analysis spec (YAML); default: the default analysis"
    )
    parser.add_argument("--plot", action="store_true", help="also write PNG plots (needs matplotlib)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="spec overrides, e.g. steps=[0,1000]"
    )
    args = parser.parse_args(argv)

    spec = load_spec(args.config, args.overrides)
    # every run as a local folder in pico's layout (a pico-train run converted, a Hub run downloaded)
    read, write = analysis_runs(spec, runs=args.run, hub_repos=args.hub, revision=args.revision)
    rows = analyze(read, spec)
    written = save(rows, write, spec, plot=args.plot)
    pngs = [p for p in written if str(p).endswith(".png")]
    print(f"{len(rows)} values; wrote:")
    for path in written:
        if path not in pngs:
            print(f"  {path}")
    for folder in sorted({p.parent for p in map(Path, pngs)}):
        print(f"  {folder}/ ({sum(Path(p).parent == folder for p in pngs)} plots)")


if __name__ == "__main__":
    main()
