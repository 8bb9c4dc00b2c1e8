"""Speed of pico.metrics against straightforward float64 NumPy implementations, and of a whole analysis pass.

    python benchmarks/metrics_speed.py                 # realistic sizes (several minutes on 2 CPU cores)
    python benchmarks/metrics_speed.py --quick         # small sizes, seconds

Activations (samples × features) for cka / pwcca, weight matrices for per / condition_number / norms /
gini / hoyer. References: Kornblith et al.'s Gram-matrix CKA (center_gram + HSIC), PWCCA by whitening the
covariances (one CCA), numpy.linalg.svd for spectra, numpy sort for Gini. pico-analyze's PWCCA took 11.0 s
on 4096×384 on the project's benchmark machine; its ratio is printed from that number. The analysis passes
compare `pico.analysis.analyze` (each tensor loaded once per checkpoint, one SVD shared by PER, condition
number and the nuclear and spectral norms) with a pico-analyze-style loop that reloads every file for every
metric and computes in NumPy, and assert that both give the same values: `spectral` is PER, condition number
and spectral norm of weights and gradients; `default` is the default analysis of `recipes/analyze.py`.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pico.analysis import analyze  # noqa: E402
from pico.analysis.spec import DEFAULT_SPEC  # noqa: E402
from pico.metrics import cka, condition_number, gini, hoyer, norm, per, pwcca  # noqa: E402
from pico.run_dir import list_steps  # noqa: E402
from tests.analysis.fake_run import make_run  # noqa: E402

PICO_ANALYZE_PWCCA_S = 11.0  # pico-analyze, 4096×384, on the benchmark machine


# ---------------------------------------------------------------- NumPy float64 references


def ref_cka(x, y, kernel="linear"):
    def gram(a):
        if kernel == "linear":
            return a @ a.T
        sq = (a * a).sum(1)
        d2 = sq[:, None] + sq[None, :] - 2 * a @ a.T
        mid = (d2.size - 1) // 2
        return np.exp(-d2 / (2 * np.partition(d2.ravel(), mid)[mid]))  # lower median, as pico

    def centre(k):
        means = k.mean(0)
        return k - means[:, None] - means[None, :] + means.mean()

    k, l = centre(gram(x)), centre(gram(y))
    return float((k * l).sum() / (np.linalg.norm(k) * np.linalg.norm(l)))


def ref_pwcca(x, y):
    x, y = x - x.mean(0), y - y.mean(0)

    def inv_sqrt(c):
        w, v = np.linalg.eigh(c)
        return v @ np.diag(w**-0.5) @ v.T

    sx, sy = inv_sqrt(x.T @ x), inv_sqrt(y.T @ y)
    u, rho, _ = np.linalg.svd(sx @ (x.T @ y) @ sy)
    h = x @ sx @ u[:, : len(rho)]
    alpha = np.abs(h.T @ x).sum(1)
    return float(alpha @ rho / alpha.sum())


def ref_per(w):
    s = np.linalg.svd(w, compute_uv=False)
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()) / min(w.shape))


def ref_gini(w):
    c = np.sort(np.abs(w.ravel()))
    n = c.size
    return float(1 - 2 * ((c / c.sum()) * ((n - np.arange(1, n + 1) + 0.5) / n)).sum())


REFERENCES = {
    "cka": lambda x, y: ref_cka(x, y),
    "cka_rbf": lambda x, y: ref_cka(x, y, "rbf"),
    "pwcca": ref_pwcca,
    "per": ref_per,
    "condition_number": lambda w: float((s := np.linalg.svd(w, compute_uv=False))[0] / s[-1]),
    "norm_nuc": lambda w: float(np.linalg.svd(w, compute_uv=False).sum()),
    "norm_spectral": lambda w: float(np.linalg.svd(w, compute_uv=False)[0]),
    "norm_inf": lambda w: float(np.abs(w).sum(1).max()),
    "gini": ref_gini,
    "hoyer": lambda w: float((np.sqrt(w.size) - np.abs(w).sum() / np.linalg.norm(w)) / (np.sqrt(w.size) - 1)),
}
PICO = {
    "cka": cka,
    "cka_rbf": lambda x, y: cka(x, y, kernel="rbf"),
    "pwcca": pwcca,
    "per": per,
    "condition_number": condition_number,
    "norm_nuc": lambda w: norm(w, "nuc"),
    "norm_spectral": lambda w: norm(w, "spectral"),
    "norm_inf": lambda w: norm(w, "inf"),
    "gini": gini,
    "hoyer": hoyer,
}
COMPARATIVE = ("cka", "cka_rbf", "pwcca")


def timed(fn, *args, repeats: int) -> tuple[float, float]:
    """(best wall time in seconds over `repeats` calls after one warm-up, the value)."""
    value = fn(*args)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, value


def metric_table(args):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    g = np.random.default_rng(0)
    inputs = {}
    for features in args.features:
        x = g.standard_normal((args.samples, features))
        y = np.tanh(
            x @ g.standard_normal((features, features)) / np.sqrt(features)
        )  # a related representation
        inputs[f"act {args.samples}x{features}"] = (x, y)
    inputs[f"weight {args.weight[0]}x{args.weight[1]}"] = (g.standard_normal(args.weight) * 0.02,)
    print(
        f"{'metric':<18}{'input':<20}{'device':<8}{'pico ms':>10}"
        f"{'numpy f64 ms':>14}{'ratio':>8}{'rel diff':>10}"
    )
    pwcca_cpu = {}
    for label, arrays in inputs.items():
        names = COMPARATIVE if len(arrays) == 2 else [n for n in PICO if n not in COMPARATIVE]
        for name in names:
            if name == "cka_rbf" and arrays[0].shape[0] > args.rbf_max_samples:
                continue
            ref_s, ref_v = timed(REFERENCES[name], *arrays, repeats=1)
            for device in devices:
                tensors = [torch.from_numpy(a).to(device) for a in arrays]
                pico_s, pico_v = timed(PICO[name], *tensors, repeats=args.repeats)
                if name == "pwcca" and device == "cpu":
                    pwcca_cpu[label] = pico_s
                print(
                    f"{name:<18}{label:<20}{device:<8}{pico_s * 1e3:>10.1f}{ref_s * 1e3:>14.1f}"
                    f"{ref_s / pico_s:>7.1f}x{abs(pico_v - ref_v) / max(abs(ref_v), 1e-300):>10.1e}"
                )
    for label, seconds in pwcca_cpu.items():
        if label.endswith("x384") and label.startswith("act 4096"):
            print(
                f"\npwcca {label} CPU: {seconds:.3f} s vs pico-analyze {PICO_ANALYZE_PWCCA_S:.1f} s "
                f"-> {PICO_ANALYZE_PWCCA_S / seconds:.0f}x faster (goal: 50x)"
            )


def reference_pass(run: Path, metrics: dict) -> dict:
    """pico-analyze style: for every metric, reload every checkpoint's files and compute in NumPy float64.

    `metrics` maps a table label to a reference function; weight and gradient metrics take one matrix, a
    label `cka@step_<N>` compares each step's eval activations with step N's (reloaded as well).
    Returns {(label, step, split (None for weights), tensor key): value}.
    """

    def load(step: int, name: str) -> dict:
        return load_file(run / "checkpoints" / f"step_{step}" / "learning_dynamics" / f"{name}.safetensors")

    def f64(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float64)

    values = {}
    for label, fn in metrics.items():
        for step in list_steps(run):
            if label.startswith("cka@step_"):
                x, y = load(step, "eval"), load(int(label.removeprefix("cka@step_")), "eval")
                for key in (k for k in x if k.startswith("activations.")):
                    values[label, step, "eval", key] = fn(f64(x[key]), f64(y[key]))
                continue
            for key, w in load(step, "weights").items():
                values[label, step, None, key] = fn(f64(w))
            for split in ("train", "eval"):
                for key, g in load(step, split).items():
                    if key.startswith("gradients."):
                        values[label, step, split, key] = fn(f64(g))
    return values


# The analysis passes timed: the three metrics that share one SVD, and the default analysis (what
# `python recipes/analyze.py --run DIR` computes: also the nuclear, Frobenius and inf norms and CKA).
PASSES = {
    "spectral": {
        "metrics": ["per", "condition_number", {"name": "norm", "kind": "spectral"}],
        "data_types": ["weights", "gradients"],
    },
    "default": DEFAULT_SPEC,
}
PASS_REFERENCES = {**REFERENCES, "norm_fro": lambda w: float(np.linalg.norm(w))}  # by table label


def analysis_table(args):
    steps = tuple(range(0, 10 * args.run_every, args.run_every))
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(
            Path(tmp) / "bench",
            steps=steps,
            n_layers=args.run_layers,
            d_model=args.run_d_model,
            n_heads=args.run_d_model // 64 or 1,
            n_kv_heads=args.run_d_model // 64 or 1,
            hidden=4 * args.run_d_model,
            n_samples=args.run_samples,
        )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(
            f"\nanalysis passes: {len(steps)} checkpoints, {args.run_layers} layers × 3 modules, "
            f"d_model {args.run_d_model}, {args.run_samples} samples; median of {args.analysis_repeats} "
            "runs [min, max]; both sides alternate, so they see the same machine load"
        )
        print(f"{'pass':<10}{'values':>7}  {'':<30}{'seconds':>22}{'ratio':>22}{'max rel diff':>14}")
        for name in args.passes:
            spec = PASSES[name]
            pico_s, ref_s = [], []
            for _ in range(args.analysis_repeats):
                start = time.perf_counter()
                rows = analyze([run], spec, progress=False)
                pico_s.append(time.perf_counter() - start)
                labels = {r.metric for r in rows}
                start = time.perf_counter()
                ref = reference_pass(run, {m: PASS_REFERENCES[m.split("@")[0]] for m in labels})
                ref_s.append(time.perf_counter() - start)
            assert len(ref) == len(rows), (len(ref), len(rows))
            worst = max(
                abs(
                    r.value
                    - (v := ref[r.metric, r.step, r.split, f"{r.data_type}.layers.{r.layer}.{r.component}"])
                )
                / abs(v)
                for r in rows
            )
            assert worst < 1e-9, (
                f"{name}: analysis and the reference disagree: relative difference {worst:.1e}"
            )
            ratios = sorted(r / p for r, p in zip(ref_s, pico_s))
            print(
                f"{name:<10}{len(rows):>7}  {f'pico.analysis.analyze ({device})':<30}{spread(pico_s):>22}"
                f"{f'{np.median(ratios):.1f}x [{ratios[0]:.1f}, {ratios[-1]:.1f}]':>22}{worst:>14.1e}"
            )
            print(f"{'':<17}{'reload-per-metric NumPy f64':<30}{spread(ref_s):>22}{'1.0x':>22}")


def spread(seconds: list[float]) -> str:
    """`median [min, max]` of timings in seconds."""
    return f"{np.median(seconds):.2f} [{min(seconds):.2f}, {max(seconds):.2f}]"


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--features", type=int, nargs="+", default=[384, 1536])
    parser.add_argument("--weight", type=int, nargs=2, default=[1536, 6144])
    parser.add_argument(
        "--rbf-max-samples", type=int, default=4096, help="skip RBF CKA above this many samples"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--run-d-model", type=int, default=384)
    parser.add_argument("--run-layers", type=int, default=4)
    parser.add_argument("--run-samples", type=int, default=256)
    parser.add_argument("--run-every", type=int, default=100)
    parser.add_argument("--analysis-repeats", type=int, default=3)
    parser.add_argument(
        "--passes", nargs="+", choices=list(PASSES), default=list(PASSES), help="analysis passes to time"
    )
    parser.add_argument("--skip-analysis", action="store_true")
    parser.add_argument("--skip-metrics", action="store_true", help="only the analysis pass")
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: 1024 samples, 128/256 features, ..."
    )
    args = parser.parse_args()
    if args.quick:
        args.samples, args.features, args.weight = 1024, [128, 256], [256, 1024]
        args.run_d_model, args.run_layers, args.run_samples = 128, 2, 128
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}\n"
    )
    if not args.skip_metrics:
        metric_table(args)
    if not args.skip_analysis:
        analysis_table(args)


if __name__ == "__main__":
    main()
