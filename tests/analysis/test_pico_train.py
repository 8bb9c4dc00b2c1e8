"""pico-train runs read by pico.analysis, locally and from the Hub (through tests/hub/standin.py), against
runs written exactly as pico-train's trainer writes them (tests/pico_train_format.py) and float64
recomputations: every step analysed, each split from the commit that wrote it, gradients as batch means where
that is exact and labelled where not, one-device activations refused, the eval batch rebuilt, modules outside
layers.<i>."""

import io
import re
from contextlib import redirect_stdout

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import pico.hub.api
from pico.analysis import AnalysisError, open_run, read_csv
from pico.analysis.pico_train import as_pico_run
from pico.analysis.sources import fetch_run
from pico.components import ov_circuit
from pico.hub import HubError
from pico.model import PicoDecoder
from pico.run_dir import dynamics_file, step_dir
from recipes.analyze import main as analyze_main
from tests.analysis.fake_run import make_run
from tests.hub.standin import LocalHub
from tests.pico_train_format import (
    module_prefix,
    reference_model,
    replay_on_hub,
    write_eval_data,
    write_pico_train_run,
)

REPO = "pico-lm/pico-decoder-test"
MODULES = [f"layers.{i}.{m}" for i in (0, 1) for m in ("attention.v_proj", "attention.o_proj", "swiglu.w_2")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Finished runs, max_steps 4, save_every 2 (steps 0, 2 with train and val; 4 with val only): one device
    (learning-dynamics sub-batches of 3: 8 train rows are 3, 3, 2), two devices (sub-batches of 2 per rank: 8
    train rows even, 5 eval rows padded to 6)."""
    root = tmp_path_factory.mktemp("pico_train")
    return {
        1: write_pico_train_run(root / "one", world_size=1, ld_batch_size=3),
        2: write_pico_train_run(root / "two", world_size=2, ld_batch_size=4),
    }


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fresh Hub stand-in that every Hub call of this test goes to."""
    standin = LocalHub(tmp_path / "standin")
    standin.set_faults()
    monkeypatch.setattr(pico.hub.api, "connect", lambda: standin)
    return standin


def as_pico(run, source: str, hub, tmp_path):
    """The run in pico's layout: converted from its folder, or replayed onto the stand-in and fetched."""
    if source == "local":
        return as_pico_run(run.path)
    replay_on_hub(hub, run, REPO)
    return fetch_run(REPO, run.run_name, needs_config=False, root=tmp_path / "hub")


def analyze(*args) -> list:
    """Run recipes/analyze.py; the rows of the metrics.csv files it wrote (one per run)."""
    out = io.StringIO()
    with redirect_stdout(out):
        analyze_main(list(args))
    lines = [line.strip() for line in out.getvalue().splitlines()]
    return [row for line in lines if line.endswith("metrics.csv") for row in read_csv(line)]


def error_of(capsys, *args) -> str:
    """recipes/analyze.py's one-line error (exit code 2)."""
    with pytest.raises(SystemExit) as e:
        analyze_main(list(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    return err


def tensors(path) -> dict:
    return load_file(path) if path.is_file() else {}


def metadata(path) -> dict:
    with safe_open(path, framework="pt") as f:
        return f.metadata()


def stored(run, step, name) -> dict:
    """A pico-train .pt file of the run, module names without the wrapper's prefix."""
    prefix = module_prefix(run.world_size)
    data = torch.load(run.dynamics_dir(step) / name, weights_only=True)
    return {k.removeprefix(prefix): v for k, v in data.items()}


def float64_model(run, step):
    return reference_model(run.config["model"], {k: v.double() for k, v in run.states[step].items()})


def batch_mean_gradients(run, step, rows) -> dict:
    """∇ of the mean token cross-entropy over all `rows`, W_step, float64."""
    model = float64_model(run, step)
    F.cross_entropy(model(rows[:, :-1]).transpose(1, 2), rows[:, 1:]).backward()
    return {n.removesuffix(".weight"): p.grad for n, p in model.named_parameters()}


def module_outputs(run, step, rows, position) -> dict:
    """Every Linear's output at `position`, W_step, float64: what a hook should store."""
    model, outs = float64_model(run, step), {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.register_forward_hook(lambda m, i, o, name=name: outs.__setitem__(name, o[:, position]))
    model(rows[:, :-1])
    return outs


# --- 1. a finished run reads ---------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["local", "hub"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_a_finished_run_is_analysed_and_the_steps_without_a_split_are_named(
    runs, world_size, source, hub, tmp_path, monkeypatch, capsys
):
    run = runs[world_size]
    if source == "hub":
        replay_on_hub(hub, run, REPO)
        monkeypatch.chdir(tmp_path)
        rows = analyze("--hub", REPO, "--revision", run.run_name)
    else:
        rows = analyze("--run", str(run.path))
    err = capsys.readouterr().err
    assert {(r.step, r.split) for r in rows} == {
        (0, "train"),
        (2, "train"),
        (0, "eval"),
        (2, "eval"),
        (4, "eval"),
    } | {(s, None) for s in (0, 2, 4)}
    assert [line for line in err.splitlines() if "split" in line] == [
        "analysis: pico-decoder-test-1: no train split at step 4 (no rows for those)"
    ]
    activations = {r.step for r in rows if r.data_type == "activations"}
    if world_size == 1:  # the default analysis' cka on eval activations: refused, said once
        assert not activations
        assert (
            "analysis: pico-decoder-test-1: activations (eval) are not analysed: pico-train on one device"
            in err
        )
    else:
        assert activations == {0, 2, 4}


# --- 2. never another step's data ------------------------------------------------------------------------
LD_TITLE = re.compile(r"Saving Learning Dynamics Data \((train|val)\) -- Step (\d+)")


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_hub_serves_each_split_from_the_commit_that_wrote_it(runs, world_size, hub, tmp_path):
    run = runs[world_size]
    replay_on_hub(hub, run, REPO)
    fetched = fetch_run(REPO, run.run_name, needs_config=False, root=tmp_path / "hub")
    titles = {c.id: c.title for c in hub.list_commits(REPO, run.run_name)}
    downloads = hub.calls("downloaded")
    assert downloads[0]["files"] == ["training_config.yaml"]
    for call in downloads[1:]:  # each at a split's commit, only that split's files
        split, step = LD_TITLE.fullmatch(titles[call["revision"]]).groups()
        assert call["files"] and all(f.startswith(f"learning_dynamics/{split}_") for f in call["files"]), call
    final_val = next(i for i, t in titles.items() if t == "Saving Learning Dynamics Data (val) -- Step 4")
    assert "learning_dynamics/train_gradients.pt" in hub.list_files(
        REPO, final_val
    )  # step 2's, never deleted
    assert not dynamics_file(step_dir(fetched, 4), "train").is_file()
    weights = tensors(dynamics_file(step_dir(fetched, 4), "weights"))
    for module in MODULES:  # W_4, not the W_2 the final commit's tree also holds
        torch.testing.assert_close(
            weights[f"weights.{module}"], run.states[4][f"{module}.weight"], rtol=0, atol=0
        )
    local = as_pico_run(run.path)
    for step in (0, 2, 4):
        for name in ("train", "eval", "weights"):
            got, expected = (tensors(dynamics_file(step_dir(r, step), name)) for r in (fetched, local))
            assert got.keys() == expected.keys() and bool(got) == (name != "train" or step < 4)
            for key, value in expected.items():
                assert torch.equal(got[key], value), (step, name, key)


def test_a_split_file_its_commit_did_not_change_is_refused(runs, hub, tmp_path):
    run = runs[2]
    replay_on_hub(hub, run, REPO)
    # a later val commit that rewrote val_weights.pt and val_activations.pt, but not val_gradients.pt
    old = {k: (run.dynamics_dir(0) / f"val_{k}.pt").read_bytes() for k in ("weights", "activations")}
    title = "Saving Learning Dynamics Data (val) -- Step 6"
    commit = hub.add_commit(
        REPO, run.run_name, title, {f"learning_dynamics/val_{k}.pt": b for k, b in old.items()}
    )
    with pytest.raises(HubError) as e:
        fetch_run(REPO, run.run_name, needs_config=False, steps=[6], root=tmp_path / "hub")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(
        f"{REPO}@{commit} ('{title}'): learning_dynamics/val_gradients.pt was last changed"
    )
    assert "another step's data" in message


# --- 3. gradients mean what the docs say -----------------------------------------------------------------
def test_gradients_are_the_batch_mean_where_exact_and_labelled_otherwise(runs):
    two = as_pico_run(runs[2].path)
    path = dynamics_file(step_dir(two, 0), "train")  # 8 rows, 2 ranks, 2 sub-batches of 2 per rank: exact
    assert metadata(path)["gradients"] == "batch mean"
    expected = batch_mean_gradients(runs[2], 0, runs[2].train_batches[0])
    for module in MODULES:
        torch.testing.assert_close(
            tensors(path)[f"gradients.{module}"].double(), expected[module], rtol=1e-4, atol=1e-7
        )
    path = dynamics_file(step_dir(two, 2), "eval")  # 5 rows padded to 6: rank sub-batches of 2 then 1
    assert metadata(path)["gradients"] == (
        "mean of sub-batch means (pico-train: 2 sub-batches of 2, 1 rows on each of 2 ranks, "
        "1 row repeated to pad)"
    )
    expected = batch_mean_gradients(runs[2], 2, runs[2].eval_batch)
    raw = stored(runs[2], 2, "val_gradients.pt")
    for module in MODULES:
        got = tensors(path)[f"gradients.{module}"]
        torch.testing.assert_close(got * 2, raw[module], rtol=1e-6, atol=0)
        assert (got.double() - expected[module]).norm() > 1e-3 * expected[module].norm()  # not the batch mean
    one = as_pico_run(runs[1].path)
    path = dynamics_file(step_dir(one, 2), "train")
    assert (
        metadata(path)["gradients"] == "mean of sub-batch means (pico-train: 3 sub-batches of 3, 3, 2 rows)"
    )
    raw = stored(runs[1], 2, "train_gradients.pt")
    for module in MODULES:
        torch.testing.assert_close(
            tensors(path)[f"gradients.{module}"] * 3, raw[module], rtol=1e-6, atol=1e-9
        )


def test_runs_whose_gradients_mean_different_things_are_not_compared(runs, tmp_path, capsys):
    pico_run = make_run(tmp_path / "run-1", steps=(0, 10))
    err = error_of(capsys, "--run", str(runs[2].path), "--run", str(pico_run))
    assert err.startswith(
        "analysis error: eval gradients of pico-decoder-test-1 are the mean of sub-batch means (pico-train:"
    )
    assert "and of run-1 the batch mean: comparing them would mix two quantities" in err
    rows = analyze("--run", str(runs[2].path), "--run", str(pico_run), "splits=[train]")  # batch means both
    assert {r.run for r in rows if r.data_type == "gradients"} == {"pico-decoder-test-1", "run-1"}


# --- 4. one-device activations are refused; several devices' are the modules' outputs -------------------
def test_one_device_activations_are_refused_with_one_line(runs, capsys):
    err = error_of(capsys, "--run", str(runs[1].path), "data_types=[activations]", "metrics=[per]")
    assert err.startswith(
        "analysis error: nothing left to analyse in pico-decoder-test-1: no train split at step 4 "
        "(no rows for those); activations (eval, train) are not analysed: pico-train on one "
    )
    assert (
        "(training.fabric.num_devices x num_nodes = 1) stores each sub-batch's activations transposed" in err
    )
    run = open_run(as_pico_run(runs[1].path))
    with pytest.raises(AnalysisError, match="activations refused: pico-train on one device") as e:
        run.tensor("activations", "layers.0.attention.v_proj", step=0, split="eval")
    assert "\n" not in str(e.value)
    expected = batch_mean_gradients(runs[1], 0, runs[1].train_batches[0])["layers.0.attention.v_proj"]
    assert run.tensor("gradients", "layers.0.attention.v_proj", step=0, split="train").shape == expected.shape
    assert run.tensor("weights", "layers.0.attention.v_proj", step=0).shape == expected.shape


def test_several_devices_activations_are_the_modules_outputs(runs):
    run = runs[2]
    converted = open_run(as_pico_run(run.path), dtype="float64")
    for step, split, rows in ((0, "train", run.train_batches[0]), (4, "eval", run.eval_batch)):
        truth = module_outputs(run, step, rows, -1)
        for module in MODULES:
            got = converted.tensor("activations", module, step=step, split=split)
            torch.testing.assert_close(got, truth[module], rtol=1e-5, atol=1e-6)
    assert torch.equal(converted.checkpoint(0).input_ids("train"), run.train_batches[0].int())


# --- 5. the eval batch, rebuilt where its dataset is at hand ---------------------------------------------
def test_the_eval_batch_is_rebuilt_only_from_data_at_hand(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))

    def eval_ids(run):
        converted = as_pico_run(run.path)
        return [tensors(dynamics_file(step_dir(converted, s), "eval")).get("input_ids") for s in (0, 2)]

    small = {"world_size": 2, "ld_batch_size": 4, "max_steps": 2}
    local = tmp_path / "paloma"
    run = write_pico_train_run(tmp_path / "local", eval_data=str(local), **small)
    write_eval_data(local, run.eval_batch)
    assert all(torch.equal(ids, run.eval_batch.int()) for ids in eval_ids(run))
    run = write_pico_train_run(tmp_path / "absent", **small)  # pico-lm/pretokenized-paloma-tinsy, not cached
    assert eval_ids(run) == [None, None]
    run = write_pico_train_run(tmp_path / "cached", **small)
    repo = tmp_path / "hub_cache" / "datasets--pico-lm--pretokenized-paloma-tinsy"
    write_eval_data(repo / "snapshots" / ("a" * 40), run.eval_batch)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert all(torch.equal(ids, run.eval_batch.int()) for ids in eval_ids(run))
    other = tmp_path / "other"
    run = write_pico_train_run(tmp_path / "mismatch", eval_data=str(other), **small)
    write_eval_data(other, run.eval_batch[:3])
    with pytest.raises(
        AnalysisError, match=r"the val split of .*other here has 3 rows, the step's val activations 5"
    ):
        as_pico_run(run.path)


# --- 6. modules outside layers.<i>, positions, dtypes, RoPE order, OV circuits ---------------------------
@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Two devices; q, k, v, o of every layer and, by substring, embedding_proj and de_embedding_proj;
    activations at position 0."""
    suffixes = [f"attention.{m}_proj" for m in "qkvo"] + ["embedding_proj"]
    root = tmp_path_factory.mktemp("wide")
    return write_pico_train_run(
        root, run_name="pico-decoder-wide-1", world_size=2, ld_batch_size=4, suffixes=suffixes, sequence_idx=0
    )


@pytest.mark.parametrize("source", ["local", "hub"])
def test_modules_outside_layers_positions_rope_order_and_ov_circuits(wide, source, hub, tmp_path):
    converted = as_pico(wide, source, hub, tmp_path)
    run = open_run(converted, dtype="float64")
    layers = [f"layers.{i}.attention.{m}_proj" for i in (0, 1) for m in "qkvo"]
    assert sorted(run.modules("weights", step=2)) == sorted(layers + ["embedding_proj", "de_embedding_proj"])
    assert metadata(dynamics_file(step_dir(converted, 2), "eval"))["positions"] == "0"
    model = PicoDecoder.from_pretrained(wide.step_dir(2)).double()  # pico's q/k row order
    outputs = {}
    for name in layers:
        module = model.get_submodule(name)
        module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o[:, 0]))
        torch.testing.assert_close(run.tensor("weights", name, step=2), module.weight, rtol=0, atol=0)
    model(wide.eval_batch[:, :-1])
    for name in layers:
        torch.testing.assert_close(
            run.tensor("activations", name, step=2, split="eval"), outputs[name], rtol=1e-5, atol=1e-6
        )
    c = wide.config["model"]
    heads, kv, d = c["attention_n_heads"], c["attention_n_kv_heads"], c["d_model"] // c["attention_n_heads"]
    state = {k: v.double() for k, v in wide.states[2].items()}
    for layer in (0, 1):
        w_v, w_o = (state[f"layers.{layer}.attention.{m}_proj.weight"] for m in "vo")
        expected = torch.stack(
            [
                w_o[:, h * d : (h + 1) * d] @ w_v[(h // (heads // kv)) * d : (h // (heads // kv) + 1) * d]
                for h in range(heads)
            ]
        )
        got = run.component("ov_circuit", layer, "weights", step=2)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        attention = model.layers[layer].attention
        torch.testing.assert_close(
            got, ov_circuit(attention.v_proj.weight, attention.o_proj.weight, heads, kv)
        )


def test_modules_outside_layers_are_analysed(wide):
    rows = analyze(
        "--run", str(wide.path), "metrics=[per]", "data_types=[weights, activations]", "splits=[eval]"
    )
    for component in ("embedding_proj", "de_embedding_proj"):
        found = {(r.step, r.data_type) for r in rows if r.component == component}
        assert found == {(s, t) for s in (0, 2, 4) for t in ("weights", "activations")}
        assert all(r.layer is None for r in rows if r.component == component)


def test_activations_at_different_positions_are_not_compared(runs, wide, capsys):
    args = ["metrics=[cka]", "compare=runs", "data_types=[activations]", "splits=[eval]"]
    err = error_of(capsys, "--run", str(runs[2].path), "--run", str(wide.path), *args)
    assert re.fullmatch(
        r"analysis error: cka: eval activations of \S+pico-decoder-wide-1/checkpoints/step_0 are at "
        r"positions '0' and of \S+pico-decoder-test-1/checkpoints/step_0 at 'last', so they describe "
        r"different tokens",
        err,
    )


@pytest.mark.parametrize("world_size", [1, 2])
def test_bf16_mixed_runs_keep_their_dtypes(tmp_path, world_size):
    run = write_pico_train_run(
        tmp_path, world_size=world_size, ld_batch_size=4, max_steps=2, precision="bf16-mixed"
    )
    converted = as_pico_run(run.path)
    weights = dynamics_file(step_dir(converted, 0), "weights")
    dtype = "float32" if world_size == 1 else "bfloat16"  # DeepSpeed casts the module to bf16
    assert metadata(weights)["dtype"] == dtype
    model = load_file(run.step_dir(0) / "model.safetensors")  # fp32
    for key, w in tensors(weights).items():
        assert torch.equal(w.float(), model[f"pico_decoder.{key.removeprefix('weights.')}.weight"])
    train = dynamics_file(step_dir(converted, 0), "train")
    assert metadata(train)["dtype"] == ("float32" if world_size == 1 else "bfloat16, float32")
    rows = analyze("--run", str(run.path))
    assert {r.data_type for r in rows} == {"weights", "gradients"} | (
        {"activations"} if world_size == 2 else set()
    )


# --- bad input: one line naming the file -----------------------------------------------------------------
class Evil:
    """Not a tensor: weights_only loading must refuse to build it."""


def test_bad_pico_train_files_are_refused_with_one_line(tmp_path, capsys):
    run = write_pico_train_run(tmp_path, world_size=2, ld_batch_size=4, max_steps=2)
    path = run.dynamics_dir(0) / "train_weights.pt"
    torch.save({"_forward_module.module.layers.0.attention.v_proj": Evil()}, path)
    assert "train_weights.pt: holds objects torch.load(weights_only=True) refuses" in error_of(
        capsys, "--run", str(run.path)
    )
    torch.save({"_forward_module.module.layers.0.attention.v_proj": [1, 2]}, path)
    assert "train_weights.pt: entry '_forward_module.module.layers.0.attention.v_proj' is a list" in error_of(
        capsys, "--run", str(run.path)
    )
    torch.save({"_forward_module.layers.0.attention.v_proj": torch.ones(2, 3)}, path)
    assert (
        "train_weights.pt: module '_forward_module.layers.0.attention.v_proj' lacks the "
        "'_forward_module.module.' that pico-train puts before names on 2 device(s)"
    ) in error_of(capsys, "--run", str(run.path))
    (run.path / "training_config.yaml").unlink()
    assert "training_config.yaml: missing (pico-train writes it at its first checkpoint" in error_of(
        capsys, "--run", str(run.path)
    )
