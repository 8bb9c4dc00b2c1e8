"""The tidy table's rows: `Row`, one value of an analysis, and `Rows`, a list of rows that pandas reads."""

from typing import NamedTuple


class Row(NamedTuple):
    """One value of the tidy table; split, layer and head are None where they do not apply."""

    run: str
    step: int
    split: str | None
    data_type: str
    component: str
    layer: int | None
    head: int | None
    metric: str
    value: float


class Rows(list):
    """A list of NamedTuple rows (Row, EvalRow) that becomes a pandas DataFrame in one call, `to_frame()`.

    `pandas.DataFrame(rows)` gives the same named columns, since pandas reads a NamedTuple's fields.
    """

    def to_frame(self):
        """The rows as a pandas.DataFrame, one column per field (pandas: `pip install 'pico[frames]'`)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Rows.to_frame needs pandas: pip install 'pico[frames]'") from None
        return pd.DataFrame(self, columns=type(self[0])._fields if self else None)
