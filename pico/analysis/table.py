"""The tidy table's rows: `Row`, one value of an analysis, and `Rows`, a list of rows that pandas reads; and
the CSV form that metrics.csv and groups.csv share (`write_rows`, `series_of`)."""

import csv
from pathlib import Path
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


def write_rows(rows, path, columns) -> Path:
    """A CSV of NamedTuple `rows` under header `columns`: empty cells for split/layer/head where they do not
    apply, nan/inf as such."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(["" if v is None else v for v in row] for row in rows)
    return path


def series_of(record: dict) -> tuple:
    """(step, split, data_type, component, layer, head, metric) of a record of a CSV `write_rows` wrote,
    None for an empty split, layer or head."""

    def opt(v, cast):
        return None if v == "" else cast(v)

    return (
        int(record["step"]),
        opt(record["split"], str),
        record["data_type"],
        record["component"],
        opt(record["layer"], int),
        opt(record["head"], int),
        record["metric"],
    )
