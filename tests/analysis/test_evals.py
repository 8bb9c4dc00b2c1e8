"""eval.json as rows: today's paloma shape (sources, macro average, bits per byte), stderrs, and the earlier
shape whose headline was the mean over sources, read as today's."""

import json
import math

import pytest

from pico.analysis.evals import read_evals


def rows_of(tmp_path, results: dict) -> dict:
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"step": 5, **results}))
    return {(r.task, r.subset, r.metric): r.value for r in read_evals(path, "run")}


def test_todays_paloma_and_stderrs(tmp_path):
    source = {"perplexity": 90.0, "loss": math.log(90), "bits_per_byte": 1.1, "tokens": 300, "documents": 3}
    paloma = {"perplexity": 100.0, "loss": math.log(100), "bits_per_byte": 1.2, "tokens": 500, "n": 5}
    hellaswag = {"acc": 0.25, "acc_stderr": 0.05, "acc_norm": 0.3, "acc_norm_stderr": 0.06, "n": 40}
    at = rows_of(
        tmp_path,
        {
            "paloma": paloma | {"macro_perplexity": 110.0, "sources": {"c4_en": source}},
            "hellaswag": hellaswag,
            "truthfulqa_mc1": {"mc1": 1.0, "mc1_stderr": None, "n": 1},  # one document: no stderr
        },
    )
    assert at == {
        ("paloma", None, "perplexity"): 100.0,
        ("paloma", None, "loss"): math.log(100),
        ("paloma", None, "bits_per_byte"): 1.2,
        ("paloma", None, "macro_perplexity"): 110.0,
        ("paloma", "c4_en", "perplexity"): 90.0,
        ("paloma", "c4_en", "loss"): math.log(90),
        ("paloma", "c4_en", "bits_per_byte"): 1.1,
        ("hellaswag", None, "acc"): 0.25,
        ("hellaswag", None, "acc_stderr"): 0.05,
        ("hellaswag", None, "acc_norm"): 0.3,
        ("hellaswag", None, "acc_norm_stderr"): 0.06,
        ("truthfulqa_mc1", None, "mc1"): 1.0,
    }


def test_the_earlier_shape_reads_as_today(tmp_path):
    """Its top-level perplexity was the mean over sources: that is macro_perplexity, and the token-level
    perplexity is recomputed from each source's loss and tokens."""
    subsets = {
        "c4_en": {"loss": 4.0, "perplexity": math.exp(4.0), "tokens": 300, "n": 3},
        "ptb": {"loss": 5.0, "perplexity": math.exp(5.0), "tokens": 100, "n": 1},
    }
    macro = (math.exp(4.0) + math.exp(5.0)) / 2
    at = rows_of(
        tmp_path, {"paloma": {"loss": 4.5, "perplexity": macro, "tokens": 400, "n": 4, "subsets": subsets}}
    )
    loss = (4.0 * 300 + 5.0 * 100) / 400
    assert at[("paloma", None, "loss")] == pytest.approx(loss, rel=1e-15)
    assert at[("paloma", None, "perplexity")] == pytest.approx(math.exp(loss), rel=1e-15)
    assert at[("paloma", None, "macro_perplexity")] == macro
    assert at[("paloma", "ptb", "perplexity")] == math.exp(5.0)
    assert len(at) == 3 + 2 * 2  # no mean of losses, no counts
    plain = rows_of(tmp_path, {"perplexity": {"loss": 4.0, "perplexity": math.exp(4.0), "tokens": 9}})
    assert plain == {("paloma", None, "loss"): 4.0, ("paloma", None, "perplexity"): math.exp(4.0)}
