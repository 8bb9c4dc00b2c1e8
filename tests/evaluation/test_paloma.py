"""Paloma as the field reports it: every figure recomputed in float64 from the model's own cross-entropy, the
source column, rows shorter than the model's context, bits per byte against lm-evaluation-harness, and
pico-train's published number recomputed from the same rows."""

import json
import math
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from pico.evaluation import (
    TaskError,
    TaskSpec,
    evaluate_tasks,
    flat_metrics,
    format_results,
    load_tasks,
    score_requests,
)
from pico.model import PicoDecoder, from_pretrained
from tests.evaluation.conftest import SEQ_LEN, sentence

SOURCES = {"c4_en": 5, "wikitext_103": 3, "ptb": 2}  # rows per source


def byte_values() -> dict[str, int]:
    """The byte-level BPE alphabet: the printable character that stands for each byte value (GPT-2's map)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + i): b for i, b in enumerate(shifted)}


def token_bytes(tokenizer: Tokenizer, ids) -> int:
    """Bytes the tokens stand for, from the vocabulary (special tokens: none), without decoding."""
    values, special = byte_values(), {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    return sum(len(bytes(values[c] for c in tokenizer.id_to_token(i))) for i in ids if i not in special)


def tokenized_rows(tokenizer: Tokenizer, n_rows: int, row_len: int, seed: int) -> np.ndarray:
    """Rows as pico-lm's pretokenized Paloma is built: documents + EOS, concatenated, cut into rows."""
    rng, eos, stream = random.Random(seed), tokenizer.token_to_id("<|endoftext|>"), []
    while len(stream) < n_rows * row_len:
        text = " ".join(sentence(rng) for _ in range(rng.randint(1, 4)))
        stream += tokenizer.encode(text).ids + [eos]
    return np.array(stream[: n_rows * row_len], dtype=np.int64).reshape(n_rows, row_len)


def write_paloma(folder, tokenizer: Tokenizer, columns: tuple[str, ...], row_len: int = SEQ_LEN + 1):
    """Parquet rows in pretokenized Paloma's schema: input_ids, text (the decoded row) and the `columns`
    naming each row's source (one shard per source, in SOURCES order). Returns (path, ids, sources)."""
    folder.mkdir(parents=True)
    all_ids, names = [], []
    for part, (source, n) in enumerate(SOURCES.items()):
        ids = tokenized_rows(tokenizer, n, row_len, seed=part)
        table = {"input_ids": ids.tolist(), "text": tokenizer.decode_batch(ids.tolist(), False)}
        pq.write_table(pa.table(table | {c: [source] * n for c in columns}), folder / f"{part}.parquet")
        all_ids.append(ids)
        names += [source] * n
    return str(folder), np.concatenate(all_ids), names


def reference_nll(model: PicoDecoder, ids: np.ndarray) -> np.ndarray:
    """Per-token NLL of row[1:] given row[:t] in float64 from the model's logits: (N, L - 1)."""
    rows = torch.from_numpy(ids)
    with torch.no_grad():
        logits = model(rows[:, :-1]).double()  # (N, L - 1, V)
    return F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none").numpy()


@pytest.fixture(scope="module")
def tokenizer(workspace) -> Tokenizer:
    return Tokenizer.from_file(str(workspace["model_dir"] / "tokenizer.json"))


def test_every_figure_from_the_models_own_cross_entropy(workspace, tokenizer, tmp_path):
    model = from_pretrained(workspace["model_dir"])
    path, ids, names = write_paloma(tmp_path / "paloma", tokenizer, ("source",))
    (task,) = load_tasks([TaskSpec("paloma", path, batch_size=4)], workspace["model_dir"], SEQ_LEN)
    result = evaluate_tasks(model, [task], torch.device("cpu"))["paloma"]

    nll, names = reference_nll(model, ids), np.array(names)  # (N, T)
    n_bytes = np.array([token_bytes(tokenizer, row[1:]) for row in ids], dtype=np.float64)
    decoded = [len(tokenizer.decode(row[1:].tolist()).encode("utf-8")) for row in ids]
    assert n_bytes.tolist() == decoded and all(b > 0 for b in decoded)
    loss = nll.sum() / nll.size
    assert result["loss"] == pytest.approx(loss, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(nll.sum() / math.log(2) / n_bytes.sum(), rel=1e-6)
    assert result["tokens"] == nll.size == len(ids) * SEQ_LEN and result["n"] == len(ids)
    per_source = {}
    for source, n in SOURCES.items():
        rows = names == source
        got, source_loss = result["sources"][source], nll[rows].sum() / nll[rows].size
        assert got["documents"] == n and got["tokens"] == n * SEQ_LEN
        assert got["loss"] == pytest.approx(source_loss, rel=1e-6)
        assert got["perplexity"] == pytest.approx(math.exp(source_loss), rel=1e-6)
        assert got["bits_per_byte"] == pytest.approx(
            nll[rows].sum() / math.log(2) / n_bytes[rows].sum(), rel=1e-6
        )
        per_source[source] = math.exp(source_loss)
    assert sorted(result["sources"]) == sorted(SOURCES)
    assert result["macro_perplexity"] == pytest.approx(np.mean(list(per_source.values())), rel=1e-6)
    assert abs(result["macro_perplexity"] - result["perplexity"]) > 1e-3 * result["perplexity"]


def test_no_source_column_means_no_sources_and_text_is_never_one(workspace, tokenizer, tmp_path):
    model = from_pretrained(workspace["model_dir"])
    path, ids, _ = write_paloma(tmp_path / "text_only", tokenizer, ())  # input_ids and text, as 10 rows
    result = evaluate_tasks(
        model, load_tasks([TaskSpec("paloma", path)], None, SEQ_LEN), torch.device("cpu")
    )["paloma"]
    nll = reference_nll(model, ids)
    assert "sources" not in result and "macro_perplexity" not in result
    assert "bits_per_byte" not in result  # no tokenizer, no bytes
    assert result["perplexity"] == pytest.approx(math.exp(nll.mean()), rel=1e-6) and result["n"] == len(ids)


def test_the_source_column_is_source_else_subdomain(workspace, tokenizer, tmp_path):
    path, _, names = write_paloma(tmp_path / "subdomain", tokenizer, ("subdomain",))
    (task,) = load_tasks([TaskSpec("paloma", path)], None, SEQ_LEN)
    assert task.sources == names
    both = tmp_path / "both"
    both.mkdir()
    table = pq.read_table(tmp_path / "subdomain" / "0.parquet")
    pq.write_table(
        table.append_column("source", pa.array(["c4_100_domains"] * len(table))), both / "a.parquet"
    )
    (task,) = load_tasks([TaskSpec("paloma", str(both))], None, SEQ_LEN)
    assert set(task.sources) == {"c4_100_domains"}
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(table.append_column("source", pa.array(list(range(len(table))))), bad / "a.parquet")
    with pytest.raises(TaskError, match=r"^paloma: .*a\.parquet: source column 'source' has type int64"):
        load_tasks([TaskSpec("paloma", str(bad))], None, SEQ_LEN)


def test_rows_shorter_than_the_context_score_their_own_length(workspace, tokenizer, tmp_path):
    """pico-lm/pretokenized-paloma-tinsy has rows of 2048 tokens for models of max_seq_len 2048: a row of L
    tokens scores its last L - 1; rows longer than seq_len + 1, or of unequal length, are errors."""
    model = from_pretrained(workspace["model_dir"])
    path, ids, _ = write_paloma(tmp_path / "short", tokenizer, ("source",), row_len=SEQ_LEN)
    result = evaluate_tasks(
        model, load_tasks([TaskSpec("paloma", path)], None, SEQ_LEN), torch.device("cpu")
    )["paloma"]
    assert result["tokens"] == len(ids) * (SEQ_LEN - 1)
    assert result["loss"] == pytest.approx(reference_nll(model, ids).mean(), rel=1e-6)
    long, _, _ = write_paloma(tmp_path / "long", tokenizer, ("source",), row_len=SEQ_LEN + 2)
    with pytest.raises(TaskError, match=rf"0\.parquet row 0: {SEQ_LEN + 2} tokens, expected seq_len \+ 1"):
        load_tasks([TaskSpec("paloma", long)], None, SEQ_LEN)
    pq.write_table(pa.table({"input_ids": [[1] * 9]}), tmp_path / "short" / "9.parquet")
    with pytest.raises(TaskError, match=r"9\.parquet row 0: 9 tokens, .*; all must have the first row's\)$"):
        load_tasks([TaskSpec("paloma", path)], None, SEQ_LEN)


def test_pico_trains_published_number_recomputes_from_the_same_rows(tmp_path):
    """docs/evaluation.md: pico-train publishes the mean over documents of exp(mean NLL of tokens 2..L); on
    rows that are its documents, that is the mean over rows of exp(-ll / tokens) of pico's paloma requests."""
    from tests.pico_train_format import per_document_perplexity, write_pico_train_run

    run = write_pico_train_run(tmp_path / "runs", max_steps=2, save_every=2)
    vocab = run.config["model"]["vocab_size"]
    rows = np.random.default_rng(0).integers(1, vocab, (6, 9))  # six documents of 9 tokens
    pq.write_table(pa.table({"input_ids": rows.tolist()}), tmp_path / "rows.parquet")
    model = PicoDecoder.from_pretrained(run.step_dir(2))
    (task,) = load_tasks([TaskSpec("paloma", str(tmp_path / "rows.parquet"))], None, model.config.max_seq_len)
    lls = score_requests(model, task.requests, torch.device("cpu"), task.max_length)  # the docs' recipe
    tokens = torch.tensor([len(c) for _, c in task.requests], dtype=torch.float64)
    recomputed = torch.exp(-lls / tokens).mean().item()
    published = per_document_perplexity(run.config["model"], run.states[2], rows.tolist())
    assert recomputed == pytest.approx(published, rel=1e-5)
    assert abs(recomputed - evaluate_tasks(model, [task], torch.device("cpu"))["paloma"]["perplexity"]) > 1e-6


def rows_of_documents(tokenizer: Tokenizer, n_docs: int, length: int) -> tuple[list[str], np.ndarray]:
    """Documents of exactly `length` tokens whose text encodes back to those tokens, and their rows
    [prefix token] + tokens: one paloma request each, the harness's single rolling window each."""
    rng, texts, rows, eos = random.Random(3), [], [], tokenizer.token_to_id("<|endoftext|>")
    while len(texts) < n_docs:
        ids = tokenizer.encode(" ".join(sentence(rng) for _ in range(12))).ids[:length]
        text = tokenizer.decode(ids)
        if tokenizer.encode(text).ids == ids:
            texts.append(text)
            rows.append([eos] + ids)
    return texts, np.array(rows, dtype=np.int64)


def test_bits_per_byte_equals_the_harness_on_the_same_documents(workspace, tokenizer, tmp_path):
    """lm-evaluation-harness's Paloma tasks: loglikelihood_rolling of each document's text, aggregated as
    bits_per_byte = -Σ ll / ln 2 / Σ UTF-8 bytes of the text (api/metrics.py `bits_per_byte`)."""
    lm_eval = pytest.importorskip("lm_eval")
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    from pathlib import Path

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    texts, rows = rows_of_documents(tokenizer, 8, 40)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": text, "source": "invented"}) + "\n" for text in texts))
    pq.write_table(pa.table({"input_ids": rows.tolist()}), tmp_path / "rows.parquet")
    template = Path(lm_eval.__file__).parent / "tasks" / "paloma" / "_paloma_template"
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "h_paloma.yaml").write_text(
        f"include: {template}\ntask: h_paloma\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    val: {docs}\ntest_split: null\n"
    )
    out = simple_evaluate(
        model=HFLM(pretrained=str(workspace["model_dir"]), device="cpu", dtype="float32", batch_size=4),
        tasks=["h_paloma"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
    )
    ours = evaluate_tasks(
        from_pretrained(workspace["model_dir"]),
        load_tasks([TaskSpec("paloma", str(tmp_path / "rows.parquet"))], workspace["model_dir"], SEQ_LEN),
        torch.device("cpu"),
    )["paloma"]
    assert ours["bits_per_byte"] == pytest.approx(out["results"]["h_paloma"]["bits_per_byte,none"], rel=1e-6)


def test_tensorboard_tags_and_console_lines_follow_the_new_names():
    source = {"perplexity": 90.0, "loss": 4.5, "bits_per_byte": 1.1, "tokens": 300, "documents": 3}
    results = {
        "paloma": {"perplexity": 100.0, "loss": 4.6, "bits_per_byte": 1.2, "tokens": 500, "n": 5}
        | {"macro_perplexity": 110.0, "sources": {"c4_en": source}},
        "hellaswag": {"acc": 0.25, "acc_stderr": 0.05, "acc_norm": 0.3, "acc_norm_stderr": 0.06, "n": 40},
        "truthfulqa_mc1": {"mc1": 1.0, "mc1_stderr": None, "n": 1},
    }
    assert flat_metrics(results) == {
        "eval/paloma/perplexity": 100.0,
        "eval/paloma/loss": 4.6,
        "eval/paloma/bits_per_byte": 1.2,
        "eval/paloma/macro_perplexity": 110.0,
        "eval/paloma/c4_en/perplexity": 90.0,
        "eval/paloma/c4_en/loss": 4.5,
        "eval/paloma/c4_en/bits_per_byte": 1.1,
        "eval/hellaswag/acc": 0.25,
        "eval/hellaswag/acc_stderr": 0.05,
        "eval/hellaswag/acc_norm": 0.3,
        "eval/hellaswag/acc_norm_stderr": 0.06,
        "eval/truthfulqa_mc1/mc1": 1.0,
    }
    assert format_results(results) == [
        "paloma          | perplexity 100.0000 | loss 4.6000 | bits_per_byte 1.2000 | "
        "macro_perplexity 110.0000 | n 5",
        "hellaswag       | acc 0.2500 ± 0.0500 | acc_norm 0.3000 ± 0.0600 | n 40",
        "truthfulqa_mc1  | mc1 1.0000 | n 1",
    ]
