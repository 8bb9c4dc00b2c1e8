"""The forks are pinned to pretrain.py: recipes/pretrain.py with the hunks docs/case_studies.md shows for a
fork is that fork, statement for statement. A change to pretrain.py that a fork misses, or a fork change the
docs do not show, fails here with the statements that differ.

Compared are the statements after the module docstring and the imports (those are the fork's own), as
token sequences: line breaks inside brackets, trailing commas, comments and blank lines do not count, so a
reformatted line is the same statement; the indentation of a statement relative to its hunk does.

A documented hunk is a ```diff block of the fork's section (or a part of it between two ` ...` lines, which
stand for unchanged statements): its ` ` and `-` lines must occur exactly once in pretrain.py, in order and
whole statements, and are replaced by its ` ` and `+` lines.
"""

import difflib
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = ROOT / "recipes" / "pretrain.py"
DOCS = ROOT / "docs" / "case_studies.md"
FORKS = {"relora": "## ReLoRA", "maml": "## MAML"}  # fork -> the heading of its section in DOCS

Statement = tuple[int, str]  # (indentation of its first line, its tokens joined by spaces)


def statements(source: str) -> list[Statement]:
    """The logical lines of Python `source` as (indentation, tokens), formatting and comments left out."""
    raw = source.splitlines()
    # Every line at column 0, so that a fragment may start indented (indentation is read from `raw`).
    flat = io.StringIO("".join(line.lstrip() + "\n" for line in raw))
    out, tokens, row = [], [], 0
    for tok in tokenize.generate_tokens(flat.readline):
        if tok.type == tokenize.NEWLINE and tokens:
            out.append((len(raw[row]) - len(raw[row].lstrip()), " ".join(tokens)))
            tokens = []
        elif tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER):
            if not tokens:
                row = tok.start[0] - 1
            if tok.string in ")]}" and tokens[-1:] == [","]:
                tokens.pop()  # a magic trailing comma is formatting
            tokens.append(tok.string)
    return out


def body(source: str) -> list[Statement]:
    """The statements of a module after its docstring and its top-level imports."""
    code = statements(source)
    if code and code[0][1].startswith(('"', "r'", 'r"')):
        code = code[1:]
    return [s for s in code if not (s[0] == 0 and s[1].split()[0] in ("import", "from"))]


def documented_hunks(fork: str) -> list[tuple[list[Statement], list[Statement]]]:
    """(statements before, statements after) of every hunk the fork's section of DOCS shows, in order."""
    text = DOCS.read_text()
    start = text.index(FORKS[fork] + "\n")
    end = text.find("\n## ", start + 1)
    hunks = []
    for indent, block in re.findall(r"^( *)```diff\n(.*?)^\1```$", text[start:end], re.S | re.M):
        lines = [line[len(indent) :] for line in block.splitlines()]
        parts = [[]]
        for line in lines:
            if line.strip() == "...":
                parts.append([])
            else:
                parts[-1].append(line)
        for part in parts:
            before = "\n".join(line[1:] for line in part if line[:1] in " -")
            after = "\n".join(line[1:] for line in part if line[:1] in " +")
            hunks.append((statements(before), statements(after)))
    return hunks


def apply(code: list[Statement], before: list[Statement], after: list[Statement]) -> list[Statement]:
    """`code` with the one occurrence of `before` (same tokens, same relative indentation) replaced by
    `after`."""
    n, shown = len(before), "\n".join(s for _, s in before)
    assert n, f"a hunk without context or removed lines cannot be placed:\n{after}"
    found = [
        i
        for i in range(len(code) - n + 1)
        if [s for _, s in code[i : i + n]] == [s for _, s in before]
        and len({c[0] - b[0] for c, b in zip(code[i : i + n], before)}) == 1
    ]
    assert len(found) == 1, f"these statements occur {len(found)} times in recipes/pretrain.py:\n{shown}"
    i = found[0]
    shift = code[i][0] - before[0][0]
    return code[:i] + [(indent + shift, s) for indent, s in after] + code[i + n :]


def render(code: list[Statement]) -> list[str]:
    return [" " * indent + s for indent, s in code]


@pytest.mark.parametrize("fork", FORKS)
def test_fork_is_pretrain_with_its_documented_hunks(fork):
    expected = body(PRETRAIN.read_text())
    for before, after in documented_hunks(fork):
        expected = apply(expected, before, after)
    got = body((ROOT / "recipes" / f"{fork}.py").read_text())
    diff = "\n".join(
        difflib.unified_diff(
            render(expected),
            render(got),
            "recipes/pretrain.py + the hunks of docs/case_studies.md",
            f"recipes/{fork}.py",
            lineterm="",
        )
    )
    assert expected == got, f"port the change, or document it in docs/case_studies.md:\n{diff}"


def test_a_missed_change_fails():
    """The check has teeth: pretrain.py with one more statement no longer gives the fork, and a hunk
    whose lines pretrain.py does not hold cannot be placed."""
    source = PRETRAIN.read_text().replace(
        "    scheduler.step()\n", "    scheduler.step()\n    skipped += 0\n"
    )
    expected = body(source)
    for before, after in documented_hunks("maml"):
        expected = apply(expected, before, after)
    assert expected != body((ROOT / "recipes" / "maml.py").read_text())
    with pytest.raises(AssertionError, match="occur 0 times"):
        apply(body(PRETRAIN.read_text()), statements("loss = train_step(model)"), [])


def test_formatting_does_not_count():
    one = statements("x = f(\n    a,\n    b,  # why\n)\n\nif x:\n    y = [1, 2]\n")
    assert (
        one
        == statements("x = f(a, b)\nif x:\n    y = [1, 2]\n")
        == [(0, "x = f ( a , b )"), (0, "if x :"), (4, "y = [ 1 , 2 ]")]
    )
    assert statements("    a = 1\nb = 2\n") == [(4, "a = 1"), (0, "b = 2")]  # a fragment may start indented
