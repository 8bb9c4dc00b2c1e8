"""The PNGs of an analysis: log axes for values spanning decades, ticks at the checkpoint steps, names without
a repeated `weights`, and the training loss curve beside the metrics (train_loss.png)."""

import math

import pytest
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from pico.analysis import analyze, parse_spec, plot_rows, save, train_loss
from pico.analysis.table import Row
from tests.analysis.fake_run import make_run

STEPS = (0, 10, 20, 40, 80, 160, 200)


@pytest.fixture
def figures(monkeypatch):
    """{file stem: the figure} of every PNG saved: the real figures, looked at before they are written."""
    seen, savefig = {}, Figure.savefig

    def spy(fig, path, *args, **kwargs):
        seen[str(path).rsplit("/", 1)[-1].removesuffix(".png")] = fig
        return savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return seen


def rows(metric, values, data_type="weights", split=None, component="attention.v_proj"):
    return [Row("run", s, split, data_type, component, 0, None, metric, v) for s, v in zip(STEPS, values)]


def test_values_spanning_decades_get_a_log_axis(tmp_path, figures):
    perplexity = [math.exp(9.0 - s / 80) for s in STEPS]  # 8103 down to 662: more than a decade
    table = rows("condition_number", [10.0**k for k in range(7)])
    table += rows("per", [0.1 + s / 250 for s in STEPS])  # 0.1 to 0.9: within a decade
    table += rows("perplexity", perplexity, data_type="eval", component="paloma")
    plot_rows(table, tmp_path)
    main = {stem: fig.axes[-1] for stem, fig in figures.items()}
    assert main["condition_number__weights__attention.v_proj"].get_yscale() == "log"
    assert main["per__weights__attention.v_proj"].get_yscale() == "linear"  # within a decade: linear
    assert main["eval__paloma__perplexity"].get_yscale() == "log"
    panel = figures["per__weights__attention.v_proj"].axes[0]  # the eval panel above the plot
    assert panel.get_yscale() == "log"


def test_x_ticks_are_the_checkpoint_steps(tmp_path, figures):
    plot_rows(rows("per", [1.0] * len(STEPS)), tmp_path)
    ax = figures["per__weights__attention.v_proj"].axes[-1]
    assert list(ax.xaxis.get_minor_locator()()) == list(STEPS)  # a mark at every checkpoint
    assert list(ax.get_xticks()) == [0, 40, 80, 160, 200]  # labels at least 1/8 of the axis apart


def test_file_names_say_weights_once(tmp_path):
    paths = plot_rows(rows("per", [1.0] * 7) + rows("per", [1.0] * 7, "gradients", "eval"), tmp_path)
    assert sorted(p.name for p in paths) == [
        "per__gradients__eval__attention.v_proj.png",
        "per__weights__attention.v_proj.png",
    ]


def log_loss(run_dir, losses: dict[int, float]) -> None:
    """tensorboard `train/loss` at these steps, as the recipe's logger writes it."""
    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for step, loss in losses.items():
            writer.add_scalar("train/loss", loss, global_step=step)


def test_the_loss_curve_is_plotted_next_to_the_metrics(tmp_path, figures):
    runs = [make_run(tmp_path / "a", steps=(0, 10, 20)), make_run(tmp_path / "b", steps=(0, 10, 20), seed=1)]
    log_loss(runs[0], {s: 8.0 - s / 8 for s in range(1, 21)})
    log_loss(runs[1], {s: 9.0 - s / 8 for s in range(1, 16)})
    log_loss(runs[1], {s: 7.0 - s / 8 for s in range(11, 21)})  # resumed from step 10: logged again
    assert train_loss(runs[1]) == {s: (9.0 if s <= 10 else 7.0) - s / 8 for s in range(1, 21)}
    spec = parse_spec({"name": "p", "metrics": ["per"], "data_types": ["weights"], "components": ["w_2"]})
    written = save(analyze(runs, spec, progress=False), runs, spec, plot=True)
    plots = runs[0] / "analysis" / "p" / "plots"
    assert {plots / "train_loss.png", runs[1] / "analysis" / "p" / "plots" / "train_loss.png"} <= set(written)
    assert plots / "runs" / "train_loss.png" in written
    ax = figures["train_loss"].axes[-1]  # the comparison, saved last: one line per run
    assert [line.get_label() for line in ax.get_lines()] == ["a", "b"]
    assert list(ax.get_lines()[1].get_ydata()) == [train_loss(runs[1])[s] for s in range(1, 21)]
    assert list(ax.xaxis.get_minor_locator()()) == [0, 10, 20]
    no_loss = make_run(tmp_path / "c")  # no tensorboard: no curve, no error
    assert not any(p.name == "train_loss.png" for p in save([], [no_loss], spec, plot=True))
