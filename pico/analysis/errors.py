"""The analysis' bad-input error (a bad spec is a SpecError, pico.analysis.spec)."""

from pico.errors import PicoError


class AnalysisError(PicoError, ValueError):
    """A run that the analysis reads lacks what was asked for, or holds a file it cannot read; the message
    names the run, step, file or tensor."""

    kind = "analysis error"
