"""pico-train's pico_decoder checkpoints in pico: PicoDecoder.from_pretrained reads them without running their
remote code, with the logits of a reference forward written from pico-train's documented architecture
(tests/pico_train_format.py: interleaved RoPE, RMSNorm eps inside the root, SwiGLU w_2(silu(w_0 x) * w_1 x),
query head h on kv head h // (H/K)); recipes/evaluate.py scores such a step dir."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import pico.model.pico_train as pico_train
from pico.data.demo import train_tokenizer
from pico.evaluation import TaskSpec, evaluate_tasks, load_tasks
from pico.model import PicoDecoder
from tests.pico_train_format import (
    REMOTE_CODE_MARKER,
    ReferenceDecoder,
    model_config,
    write_hf_model,
    write_tokenizer,
)

REPO = Path(__file__).resolve().parents[2]


def pico_train_step(folder: Path, seed: int = 0, **overrides) -> tuple[Path, ReferenceDecoder]:
    """A pico-train step dir's HF model with random weights (norm gains too), and the reference model."""
    torch.manual_seed(seed)
    reference = ReferenceDecoder(model_config(**overrides))
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.2)
    write_hf_model(folder, reference.c, reference.state_dict())
    return folder, reference


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # GQA: 4 query heads on 2 kv heads, head dim 8 (padded to 16 by pico's CPU attention)
        {
            "attention_n_kv_heads": 1,
            "d_model": 64,
            "norm_eps": 1e-5,
            "position_emb_theta": 500000.0,
        },  # MQA, D 16
        {"attention_n_kv_heads": 4, "n_layers": 3},  # plain multi-head
    ],
    ids=["gqa", "mqa", "mha"],
)
def test_logits_equal_the_reference_forward(tmp_path, overrides):
    folder, reference = pico_train_step(tmp_path / "step_10", **overrides)
    model = PicoDecoder.from_pretrained(folder)
    c = reference.c
    assert model.config.to_dict() == {k: c[k] for k in pico_train.FIELDS}
    ids = torch.randint(0, c["vocab_size"], (3, c["max_seq_len"]))
    with torch.no_grad():
        expected, got = reference(ids), model(ids)
    assert expected.abs().max() > 1.0  # logits that discriminate
    assert (got - expected).abs().max() <= 1e-5
    assert not (folder / REMOTE_CODE_MARKER).exists() and "pico_decoder" not in sys.modules


def test_exported_to_llama_it_gives_transformers_the_same_logits(tmp_path):
    from transformers import LlamaForCausalLM

    folder, reference = pico_train_step(tmp_path / "step_0")
    PicoDecoder.from_pretrained(folder).save_pretrained(tmp_path / "llama")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama")
    ids = torch.randint(0, reference.c["vocab_size"], (2, reference.c["max_seq_len"]))
    with torch.no_grad():
        assert (llama(ids).logits - reference(ids)).abs().max() <= 1e-4


def test_the_q_k_row_order_is_what_makes_them_equal(tmp_path, monkeypatch):
    folder, reference = pico_train_step(tmp_path / "step_0")
    monkeypatch.setattr(pico_train, "interleaved_to_half", lambda weight, n_heads: weight)
    ids = torch.randint(0, reference.c["vocab_size"], (2, 12))
    with torch.no_grad():
        assert (PicoDecoder.from_pretrained(folder)(ids) - reference(ids)).abs().max() > 1e-2


def test_bad_checkpoints_are_refused_with_one_line_naming_the_key(tmp_path):
    folder, _ = pico_train_step(tmp_path / "step_0")
    config = json.loads((folder / "config.json").read_text())

    def refused(changed: dict, message: str):
        (folder / "config.json").write_text(json.dumps(changed))
        with pytest.raises(ValueError, match=message) as err:
            PicoDecoder.from_pretrained(folder)
        assert "\n" not in str(err.value)

    refused(config | {"rope_scaling": {"factor": 2}}, "unknown key 'rope_scaling'")
    refused({k: v for k, v in config.items() if k != "d_model"}, "missing key 'd_model'")
    refused(config | {"attention_n_kv_heads": 3}, "attention_n_heads=4 is not divisible")
    refused(config | {"n_layers": 3}, "missing parameter 'layers.2.attention_norm.weight'")
    (folder / "config.json").write_text(json.dumps(config))
    assert PicoDecoder.from_pretrained(folder).config.n_layers == 2


def test_evaluate_recipe_scores_a_pico_train_step_dir(tmp_path):
    sentences = [f"The {who} {verb} today." for who in ("cat", "dog", "bird") for verb in ("walks", "sings")]
    tokenizer = train_tokenizer(sentences, 300)
    step, reference = pico_train_step(
        tmp_path / "run" / "checkpoints" / "step_20", vocab_size=300, max_seq_len=8
    )
    write_tokenizer(tokenizer, step, 8)
    blimp = tmp_path / "blimp.jsonl"
    blimp.write_text(
        "".join(
            json.dumps({"sentence_good": s, "sentence_bad": s.replace("s today", " today"), "field": "syntax",
                        "linguistics_term": "agreement", "UID": "agreement_1", "pair_id": i}) + "\n"
            for i, s in enumerate(sentences)
        )
    )  # fmt: skip
    rows = torch.randint(0, 300, (6, 9))
    pq.write_table(
        pa.Table.from_pylist([{"input_ids": r.tolist()} for r in rows]), tmp_path / "paloma.parquet"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    args = [
        "--model",
        str(step),
        "--task",
        f"blimp={blimp}",
        "--task",
        f"paloma={tmp_path / 'paloma.parquet'}",
    ]
    output = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "evaluate.py"), *args, "--output", str(output)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(output.read_text())
    specs = [TaskSpec("blimp", str(blimp)), TaskSpec("paloma", str(tmp_path / "paloma.parquet"))]
    expected = evaluate_tasks(
        PicoDecoder.from_pretrained(step), load_tasks(specs, step, 8), torch.device("cpu")
    )
    assert results["blimp"]["acc"] == expected["blimp"]["acc"] and results["blimp"]["n"] == 6
    with torch.no_grad():  # paloma from the reference forward, float64
        logp = reference.double()(rows[:, :-1]).log_softmax(-1).gather(-1, rows[:, 1:, None])
    assert results["paloma"]["loss"] == pytest.approx(-logp.mean().item(), rel=1e-5)
    assert not (step / REMOTE_CODE_MARKER).exists()
