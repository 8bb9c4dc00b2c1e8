"""prepare: EOS and chunking arithmetic, document-level eval split, byte-identical output, the CLI."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from pico.data import DataError, TokenStream, find_tokenizer, load_stats, prepare_dataset
from pico.data.prepare import iter_documents, main, unigram_entropy

LENGTHS = [5, 3, 7, 1, 4, 6, 2, 9, 3, 5]  # words per document; one word = one token
DOCS = [" ".join(f"w{i}x{j}" for j in range(n)) for i, n in enumerate(LENGTHS)]


@pytest.fixture
def tokenizer(tmp_path):
    """A word-level tokenizer trained on DOCS, EOS `<|endoftext|>` = id 0."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(DOCS, trainers.WordLevelTrainer(special_tokens=["<|endoftext|>", "[UNK]"]))
    path = tmp_path / "tok.json"
    tok.save(str(path))
    return path


def read_rows(folder) -> np.ndarray:
    """All rows of the shards in `folder`, in file order."""
    files = sorted(folder.glob("*.parquet"))
    return np.concatenate([np.array(pq.read_table(f)["input_ids"].to_pylist()) for f in files])


def test_eos_and_chunking_arithmetic(tmp_path, tokenizer):
    stats = prepare_dataset(DOCS, tokenizer, 5, tmp_path / "out", shards=3, seed=1, row_group_size=2)["train"]
    tok = Tokenizer.from_file(str(tokenizer))
    stream = sum((tok.encode(d).ids + [0] for d in DOCS), [])  # 45 tokens + 10 EOS = 55
    assert len(stream) == 55 and stats["tokens"] == 54 and stats["dropped_tokens"] == 1 and stats["rows"] == 9
    expected = np.array(stream[:54]).reshape(9, 6)  # rows of seq_len + 1 = 6, no overlap, remainder dropped
    rows = read_rows(tmp_path / "out" / "train")
    assert sorted(map(tuple, rows)) == sorted(map(tuple, expected))
    assert not np.array_equal(rows, expected)  # shuffled
    files = sorted((tmp_path / "out" / "train").glob("*.parquet"))
    assert [f.name for f in files] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert [pq.ParquetFile(f).metadata.num_row_groups for f in files] == [2, 2, 2]
    assert pq.read_schema(files[0]).field("input_ids").type.value_type == "int32"
    assert stats["eos_id"] == 0 and stats["vocab_size"] == 47
    assert stats["unigram_entropy_nats"] == pytest.approx(unigram_entropy(expected, 47))
    assert load_stats(tmp_path / "out" / "train") == stats
    assert find_tokenizer(tmp_path / "out" / "train").read_bytes() == tokenizer.read_bytes()
    with TokenStream(tmp_path / "out" / "train", 5, 9, 3, vocab_size=47) as s:
        assert s.num_samples == 9 and next(s)[:, :-1].shape == (3, 5)


def test_eval_split_holds_out_whole_documents(tmp_path, tokenizer):
    stats = prepare_dataset(DOCS, tokenizer, 3, tmp_path / "out", seed=0, eval_fraction=0.2)
    assert stats["train"]["documents"] == 8 and stats["eval"]["documents"] == 2
    vocab = Tokenizer.from_file(str(tokenizer)).get_vocab()
    doc_of = {i: int(w[1:].split("x")[0]) for w, i in vocab.items() if w.startswith("w")}
    train_docs = {doc_of[t] for t in read_rows(tmp_path / "out" / "train").ravel() if t in doc_of}
    eval_docs = {doc_of[t] for t in read_rows(tmp_path / "out" / "eval").ravel() if t in doc_of}
    assert len(eval_docs) == 2 and not train_docs & eval_docs
    eval_tokens = sum(LENGTHS[d] + 1 for d in eval_docs)
    assert stats["eval"]["tokens"] + stats["eval"]["dropped_tokens"] == eval_tokens
    assert stats["train"]["tokens"] + stats["train"]["dropped_tokens"] == 55 - eval_tokens


def test_same_inputs_and_seed_give_identical_bytes(tmp_path, tokenizer):
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        prepare_dataset(
            DOCS, tokenizer, 2, tmp_path / name, shards=2, seed=seed, eval_fraction=0.3, row_group_size=4
        )
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 7  # 2 train + 1 eval shard, tokenizer.json and stats.json in each split
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a/train/train-00000-of-00002.parquet").read_bytes() != (
        tmp_path / "c/train/train-00000-of-00002.parquet"
    ).read_bytes()


def test_documents_from_txt_and_jsonl(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.txt").write_text("first doc\nstill first\n")
    (tmp_path / "in" / "sub" / "b.jsonl").write_text('{"text": "second"}\n\n{"text": "third", "id": 3}\n')
    (tmp_path / "in" / "notes.md").write_text("ignored: not .txt/.jsonl")
    assert list(iter_documents([str(tmp_path / "in")])) == ["first doc\nstill first\n", "second", "third"]
    assert list(iter_documents([str(tmp_path / "in" / "**" / "*.jsonl")])) == ["second", "third"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2 has no string field 'text'"):
        list(iter_documents([str(tmp_path / "bad.jsonl")]))


def test_cli(tmp_path, tokenizer, capsys):
    (tmp_path / "in").mkdir()
    for i, doc in enumerate(DOCS):
        (tmp_path / "in" / f"{i:02d}.txt").write_text(doc)
    argv = [
        "--input",
        str(tmp_path / "in"),
        "--tokenizer",
        str(tokenizer),
        "--seq-len",
        "4",
        "--out",
        str(tmp_path / "out"),
        "--shards",
        "2",
        "--seed",
        "3",
        "--eval-fraction",
        "0.1",
    ]
    main(argv)
    err = capsys.readouterr().err
    assert "prepare: 10 documents, 45 tokens" in err and "tokens/s" in err
    assert json.loads((tmp_path / "out" / "eval" / "stats.json").read_text())["documents"] == 1
    assert len(list((tmp_path / "out" / "train").glob("*.parquet"))) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "already holds parquet shards" in capsys.readouterr().err


def test_tokenizer_without_eos(tmp_path):
    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "t.json"))
    with pytest.raises(DataError, match="no end-of-document token"):
        prepare_dataset(["a a"], tmp_path / "t.json", 2, tmp_path / "out")
    with pytest.raises(DataError, match=r"missing\.json: tokenizer file not found"):
        prepare_dataset(["a a"], tmp_path / "missing.json", 2, tmp_path / "out")
