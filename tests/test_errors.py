"""pico.errors: bad input is one line `<kind>: <message>` and exit 2; anything else keeps its traceback."""

import pytest

from pico.config import ConfigError as ConfigErrorOfConfig
from pico.data import DataError
from pico.errors import AnalysisError, ConfigError, PicoError, exit_on
from pico.evaluation import TaskError
from tests.recipes.common import recipe_module


def test_exit_on_prints_one_line_of_kind_and_message(capsys):
    with pytest.raises(SystemExit) as exit_:
        with exit_on():
            raise DataError("data/x.parquet row 3:\n  token id 70 at position 2")
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "data error: data/x.parquet row 3: token id 70 at position 2\n"


def test_exit_on_lets_anything_else_through_and_is_a_decorator(capsys):
    @exit_on()
    def bug():
        raise ValueError("a typo in pico, not bad input")

    @exit_on()
    def bad_input():
        raise TaskError("blimp: x.jsonl row 0: missing column 'UID'")

    with pytest.raises(ValueError, match="a typo"):  # a traceback, not a misleading "config error"
        bug()
    for _ in range(2):  # the decorator makes a fresh context per call
        with pytest.raises(SystemExit):
            bad_input()
    assert capsys.readouterr().err == "evaluation error: blimp: x.jsonl row 0: missing column 'UID'\n" * 2


def test_every_kind_is_a_pico_error_and_a_value_error():
    for error, kind in [
        (ConfigError, "config error"),
        (DataError, "data error"),
        (TaskError, "evaluation error"),
        (AnalysisError, "analysis error"),
    ]:
        assert issubclass(error, PicoError) and issubclass(error, ValueError) and error.kind == kind
    assert ConfigErrorOfConfig is ConfigError  # one class, importable from pico.config as before


def test_a_bug_in_the_recipe_keeps_its_traceback(monkeypatch):
    """exit_on catches PicoError only: a plain ValueError from a fork's code is not turned into exit 2."""
    pretrain = recipe_module("pretrain")

    def build_model(*args):
        raise ValueError("a bug in build_model")

    monkeypatch.setattr(pretrain, "build_model", build_model)
    with pytest.raises(ValueError, match="a bug in build_model"):
        pretrain.main(["model.preset=tiny", "data.seq_len=16", "model.max_seq_len=16"])
