"""recipes/analyze.py --model: learning dynamics re-captured from HF checkpoints (pico exports, pico-train's
pico_decoder, stock Llama; local and through the Hub stand-in) equal a real run's own eval split."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import pico.hub.api
from pico.analysis import open_run, read_csv
from pico.analysis.recapture import recapture
from pico.capture import capture_weights
from pico.model import PicoDecoder, PicoDecoderConfig
from pico.model.hf import load_pretrained
from pico.run_dir import DEFAULT_LAYERS, recapture_file, step_dir
from pico.training import captured_step
from recipes.analyze import main as analyze_main
from tests.hub.standin import LocalHub
from tests.recipes.common import launch
from tests.tiny import MODEL, SEQ, write_shards

STEPS = (0, 3, 6)
REPO = "pico-lm/recapture-test"
KEY = lambda r: (r.step, r.split, r.data_type, r.component, r.layer, r.head, r.metric)  # noqa: E731


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return write_shards(root / "train", 160, seed=1), write_shards(root / "eval", 24, seed=2, files=1)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A real 6-step run with the default layers, checkpoints (HF exports, eval split) at 0, 3 and 6."""
    train, evals = data
    run_dir = tmp_path_factory.mktemp("run") / "run"
    launch(
        [
            *MODEL,
            f"data.path={train}",
            f"data.seq_len={SEQ}",
            "data.batch_size=8",
            "data.micro_batch_size=2",
            "training.max_steps=6",
            "training.lr=1e-2",
            "training.warmup_steps=1",
            f"checkpointing.run_dir={run_dir}",
            "checkpointing.save_every=3",
            f"learning_dynamics.eval_data={evals}",
            "learning_dynamics.eval_batch_size=4",
        ]
    )
    return run_dir


def exports(run) -> list[str]:
    return [str(step_dir(run, s) / "model") for s in STEPS]


def analyze(*args) -> dict[str, list]:
    """recipes/analyze.py in this process; the rows of every metrics.csv it wrote, by run name."""
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        analyze_main([str(a) for a in args])
    csvs = [line.strip() for line in out.getvalue().splitlines() if line.strip().endswith("metrics.csv")]
    return {Path(c).parents[2].name: read_csv(c) for c in csvs}


def error_of(capsys, *args) -> str:
    """The one line a bad input prints, after exit code 2."""
    with pytest.raises(SystemExit) as e:
        analyze_main([str(a) for a in args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def assert_same_metrics(rows, reference, rel=1e-3, runs=None):
    """The same (step, split, data type, component, layer, head, metric) keys; values within `rel`, the
    weights' exactly (both read them unchanged). With `runs` (re-captured, reference), a gradient's condition
    number need only lie in Weyl's interval: sigma_min moves by up to the spectral norm of the gradients'
    difference, so a near-singular gradient (kappa ~ 1e6) turns float32 rounding into ~1e-3."""
    ref = {KEY(r): r.value for r in reference}
    assert sorted(map(KEY, rows), key=str) == sorted(ref, key=str)
    for r in rows:
        if r.data_type == "weights":
            assert r.value == ref[KEY(r)], KEY(r)
        elif runs and r.metric == "condition_number":
            module = f"layers.{r.layer}.{r.component}"
            mine, theirs = (run.tensor("gradients", module, r.step, r.split) for run in runs)
            s, e = torch.linalg.svdvals(theirs), torch.linalg.matrix_norm(mine - theirs, ord=2)
            assert (s[0] - e) / (s[-1] + e) <= r.value <= (s[0] + e) / (s[-1] - e), KEY(r)
        else:
            assert r.value == pytest.approx(ref[KEY(r)], rel=rel, abs=1e-9), KEY(r)


def test_pico_exports_reproduce_the_runs_eval_split(run, data, tmp_path):
    out = tmp_path / "recaptured"
    args = [a for m in exports(run) for a in ("--model", m)]
    tables = analyze(
        "--run", run, *args, "--eval-data", data[1], "--eval-batch-size", 4, "--output", out, "--plot"
    )
    assert set(tables) == {"run", "recaptured"} and len(tables["run"]) > 100
    assert {r.split for r in tables["run"]} == {"eval", None}  # no --config: the eval split alone
    mine, theirs = open_run(out), open_run(run)
    assert_same_metrics(tables["recaptured"], tables["run"], runs=(mine, theirs))
    cross = run / "analysis" / "default" / "plots" / "runs"  # a pico run and the re-captured series, one spec
    assert (cross / "per__gradients__eval__attention.v_proj.png").is_file()
    assert (cross / "cka@step_6__activations__eval__swiglu.w_2.png").is_file()

    assert mine.steps == list(STEPS)  # parsed from the exports' paths, .../step_<N>/model
    for step in STEPS:
        assert torch.equal(mine.checkpoint(step).input_ids("eval"), theirs.checkpoint(step).input_ids("eval"))
        for module in theirs.modules("gradients", "eval"):
            assert torch.equal(mine.tensor("weights", module, step), theirs.tensor("weights", module, step))
            for kind in ("activations", "gradients"):
                got, want = mine.tensor(kind, module, step, "eval"), theirs.tensor(kind, module, step, "eval")
                assert (got - want).norm() <= 1e-5 * want.norm(), (step, kind, module)
    record = json.loads(recapture_file(out).read_text())
    assert record["names"] == "pico" and record["eval_batch_size"] == 4 and record["seq_len"] == SEQ
    assert [record["steps"][str(s)]["model"] for s in STEPS] == exports(run)

    # the output is a run directory: --run reads it again, and a compound component sees its config.json
    assert_same_metrics(analyze("--run", out, "splits=[eval]")["recaptured"], tables["recaptured"], rel=1e-12)
    ov = ["components=[ov_circuit]", "metrics=[per, gini]", "data_types=[weights, gradients]"]
    ov_tables = analyze("--run", run, "--run", out, "splits=[eval]", *ov)
    assert {r.head for r in ov_tables["run"]} == {0, 1, 2, 3}
    assert_same_metrics(ov_tables["recaptured"], ov_tables["run"], runs=(mine, theirs))


def test_transformers_equals_pico_bit_for_bit_with_unpadded_heads(data, tmp_path):
    """With heads of 16+ dimensions (no CPU head padding in pico's attention), transformers' Llama and pico's
    decoder compute the same bits: the re-capture equals pico's own captured_step exactly."""
    config = PicoDecoderConfig(
        d_model=64,
        n_layers=2,
        attention_n_heads=2,
        attention_n_kv_heads=1,
        activation_hidden_dim=96,
        vocab_size=64,
        max_seq_len=SEQ,
    )
    torch.manual_seed(0)
    model = PicoDecoder(config)
    model.save_pretrained(tmp_path / "model")
    out = recapture(
        [tmp_path / "model"], eval_data=data[1], eval_batch_size=4, output=tmp_path / "out", progress=False
    )
    run = open_run(out)
    rows = run.checkpoint(0).input_ids("eval").long()
    _, own = captured_step(model, [rows], DEFAULT_LAYERS, input_ids=rows, losses=True)
    assert torch.equal(run.tensor("losses", step=0, split="eval"), own.losses)
    weights = capture_weights(model, DEFAULT_LAYERS)
    assert sorted(own.gradients) == sorted(run.modules("gradients", "eval"))
    for module in own.gradients:
        assert torch.equal(run.tensor("activations", module, 0, "eval").float(), own.activations[module])
        assert torch.equal(run.tensor("gradients", module, 0, "eval").float(), own.gradients[module])
        assert torch.equal(run.tensor("weights", module, 0).float(), weights[module])


def half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """pico's RoPE row order (i, i + D/2) back to pico-train's pairs (2i, 2i+1): what pico-train stores."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_pico_decoder(export: str, folder: Path) -> Path:
    """The export as pico-train saves a model: config.json with model_type pico_decoder (pico's fields),
    weights `pico_decoder.<pico name>` with q/k rows in pico-train's RoPE order."""
    config, state = load_pretrained(export)
    heads = {"q_proj": config.attention_n_heads, "k_proj": config.attention_n_kv_heads}
    for name, tensor in state.items():
        proj = name.split(".")[-2]
        if proj in heads:
            state[name] = half_to_interleaved(tensor, heads[proj])
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**config.to_dict(), "model_type": "pico_decoder"}))
    save_file({f"pico_decoder.{k}": v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    return folder


def test_pico_train_models_reproduce_the_runs_eval_split_exactly(run, data, tmp_path):
    models = [
        write_pico_decoder(m, tmp_path / "pico-train" / f"step{s}") for m, s in zip(exports(run), STEPS)
    ]
    out = recapture(models, eval_data=data[1], eval_batch_size=4, output=tmp_path / "out", progress=False)
    mine, theirs = open_run(out), open_run(run)
    assert mine.steps == list(STEPS)  # from the folder names step<N>
    for step in STEPS:  # PicoDecoder, the same weights and batch, pico's own step: bit for bit
        for module in theirs.modules("gradients", "eval"):
            for kind, split in (("activations", "eval"), ("gradients", "eval"), ("weights", None)):
                assert torch.equal(
                    mine.tensor(kind, module, step, split), theirs.tensor(kind, module, step, split)
                )


def test_stock_llama_against_float64_transformers(data, tmp_path):
    """A transformers-made Llama (tied embeddings, 3 layers): activations, gradients and weights under pico's
    names equal transformers' own float64 forward/backward with full logits (the independent reference)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    layers = ("attention.v_proj", "swiglu.w_0", "de_embedding_proj")
    out = recapture(
        [str(tmp_path / "llama")],
        eval_data=data[1],
        eval_batch_size=6,
        output=tmp_path / "out",
        layers=layers,
        progress=False,
    )
    run = open_run(out)
    assert run.steps == [0]
    names = ["de_embedding_proj"] + [f"layers.{i}.{s}" for i in range(3) for s in layers[:2]]
    assert sorted(run.modules("gradients", "eval")) == sorted(names)

    model = LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float64)
    rows = run.checkpoint(0).input_ids("eval").long()  # (6, SEQ + 1)
    seen, own = (
        {},
        {"de_embedding_proj": "lm_head", "layers.1.attention.v_proj": "model.layers.1.self_attn.v_proj"},
    )
    for name, module in own.items():
        model.get_submodule(module).register_forward_hook(lambda m, a, o, name=name: seen.update({name: o}))
    logits = model(rows[:, :-1]).logits  # (6, SEQ, 64)
    F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).backward()
    for name, module in own.items():
        weight = model.get_submodule(module).weight
        torch.testing.assert_close(run.tensor("weights", name, 0), weight.detach(), rtol=0, atol=1e-7)
        torch.testing.assert_close(
            run.tensor("gradients", name, 0, "eval"), weight.grad, rtol=1e-4, atol=1e-7
        )
        torch.testing.assert_close(
            run.tensor("activations", name, 0, "eval"), seen[name][:, -1], rtol=1e-4, atol=1e-6
        )
    loss = json.loads(recapture_file(out).read_text())["steps"]["0"]["loss"]
    assert loss == pytest.approx(
        F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).item(), rel=1e-6
    )


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The Hub stand-in, with the run's exports committed as pico's uploader does (model files at the root,
    learning dynamics and state beside them), each step tagged run/step_<N>."""
    standin = LocalHub(tmp_path / "standin")
    standin.set_faults()
    monkeypatch.setattr(pico.hub.api, "connect", lambda: standin)
    return standin


def upload(hub, run):
    for step in STEPS:
        path = step_dir(run, step)
        files = {p.name: p.read_bytes() for p in (path / "model").iterdir()}
        files |= {
            f"learning_dynamics/{p.name}": p.read_bytes() for p in (path / "learning_dynamics").iterdir()
        }
        files["state/.metadata"] = b"state"
        hub.create_tag(REPO, f"run/step_{step}", hub.add_commit(REPO, "run", f"step {step}", files))


def test_hub_revisions_give_the_local_result(run, data, hub, tmp_path):
    upload(hub, run)
    local = recapture(
        exports(run), eval_data=data[1], eval_batch_size=4, output=tmp_path / "local", progress=False
    )
    revisions = [f"{REPO}@run/step_{s}" for s in STEPS]
    out = recapture(revisions, eval_data=data[1], eval_batch_size=4, output=tmp_path / "hub", progress=False)
    mine, theirs = open_run(out), open_run(local)
    assert mine.steps == list(STEPS)  # from the revisions' names
    for step in STEPS:
        for module in theirs.modules("gradients", "eval"):
            for kind, split in (("activations", "eval"), ("gradients", "eval"), ("weights", None)):
                assert torch.equal(
                    mine.tensor(kind, module, step, split), theirs.tensor(kind, module, step, split)
                )
    downloads = hub.calls("downloaded")
    assert {tuple(d["files"]) for d in downloads} == {("config.json",), ("config.json", "model.safetensors")}


def test_bad_input_is_one_line(run, data, hub, tmp_path, capsys):
    upload(hub, run)
    model, evals, out = exports(run)[0], data[1], tmp_path / "out"
    common = ["--eval-data", evals, "--eval-batch-size", 4, "--output", out]
    llama = json.loads((Path(model) / "config.json").read_text())
    neox = tmp_path / "neox"
    neox.mkdir()
    (neox / "config.json").write_text(json.dumps({**llama, "model_type": "gpt_neox"}))
    assert f"--model {neox}: model_type 'gpt_neox' is not supported" in error_of(
        capsys, "--model", neox, *common
    )
    assert "no such revision" in error_of(capsys, "--model", f"{REPO}@run/step_99", *common)
    assert f"{evals}: asked for 25 rows, the data has 24" in error_of(
        capsys, "--model", model, "--eval-data", evals, "--eval-batch-size", 25, "--output", out
    )
    assert "no such directory, and not repo_id@revision" in error_of(
        capsys, "--model", tmp_path / "nope", *common
    )
    assert "--steps: 2 steps for 1 models" in error_of(capsys, "--model", model, *common, "--steps", "0,1")
    assert "splits: a re-captured model has the eval split only" in error_of(
        capsys, "--model", model, *common, "splits=[train, eval]"
    )
    assert "a training run's directory" in error_of(
        capsys, "--model", model, "--eval-data", evals, "--output", run
    )
    assert "specs use pico's names: 'attention.v_proj'" in error_of(
        capsys, "--model", model, *common, "components=[self_attn.v_proj]"
    )
    assert "--model, --eval-data and --output go together" in error_of(capsys, "--model", model)
    hub.set_faults(offline=True)
    assert f"--model {REPO}@run/step_3: cannot fetch it" in error_of(
        capsys, "--model", f"{REPO}@run/step_3", *common
    )
    assert not (out / "checkpoints").exists()  # nothing written for any of them
