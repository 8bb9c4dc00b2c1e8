"""The errors pico's command lines answer with one line and exit code 2, and the one place that answers them.

Every error that bad input can cause (a config key, a data file, a checkpoint, the Hub, a task file) is a
`PicoError` whose message names the culprit; its `kind` starts the line. Anything else that escapes a
recipe is a bug in pico or in the fork, and keeps its traceback. A leaf module: it imports nothing from pico,
so that every module may raise these.
"""

from __future__ import annotations

import contextlib
import sys


class PicoError(Exception):
    """Bad input: the message names the culprit (key, file, row, tensor); a CLI prints `<kind>: <message>`."""

    kind = "error"


class ConfigError(PicoError, ValueError):
    """A bad configuration value (a config key, a command-line option); the message names the key."""

    kind = "config error"


class AnalysisError(PicoError, ValueError):
    """A tensor a metric or component cannot measure, or a metric parameter out of range; the message
    names the metric or component and the shape."""

    kind = "analysis error"


@contextlib.contextmanager
def exit_on():
    """Turn a PicoError raised in the block into one line `<kind>: <message>` on stderr and exit code 2.

    Also a decorator (`@exit_on()`), as every context manager made by contextlib is.
    """
    try:
        yield
    except PicoError as e:
        # One write per line: the ranks under a launcher share stderr, and print() writes the newline
        # apart, so two ranks' lines interleaved (the first line must be the cause, docs/configuration.md).
        sys.stderr.write(f"{e.kind}: {' '.join(str(e).split())}\n")
        sys.stderr.flush()
        sys.exit(2)
