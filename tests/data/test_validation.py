"""Bad input is one DataError naming the file and row; nothing is skipped or padded."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pico.data import DataError, TokenStream, read_batch
from tests.data.conftest import ROW_LEN, make_shards, write_rows

SEQ = ROW_LEN - 1


def first_batches(path, **kw):
    """Read every row of the data through the stream (one global batch of 8, one micro-batch)."""
    with TokenStream(path, SEQ, 8, 8, prefetch=0, **kw) as stream:
        return [next(stream) for _ in range(stream.num_samples // 8)]


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


OK = [1] * ROW_LEN
# A bad row 5 among 8 rows of seq_len 8 (one row group) → the message after "<file> row 5: ".
BAD_ROWS = {
    "id >= vocab": (OK[:4] + [100] + OK[:4], "token id 100 at position 4, expected in [0, vocab_size=100)"),
    "negative id": (OK[:4] + [-7] + OK[:4], "token id -7 at position 4, expected in [0, vocab_size=100)"),
    "short row": (OK[:3], "3 tokens, expected seq_len + 1 = 9"),
    "long row": (OK + [1, 1, 1], "12 tokens, expected seq_len + 1 = 9"),
    "empty row": ([], "0 tokens, expected seq_len + 1 = 9"),
    "null row": (None, "the row is null"),
    "null token": (OK[:2] + [None] + OK[:6], "null token at position 2"),
}


@pytest.mark.parametrize("prefetch", [0, 2], ids=["main thread", "prefetch thread"])
@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_row_is_one_line_at_the_first_next(tmp_path, case, prefetch):
    row, problem = BAD_ROWS[case]
    path = write_rows(tmp_path / "d" / "b.parquet", [OK] * 5 + [row] + [OK] * 2)
    stream = TokenStream(path.parent, SEQ, 4, 4, vocab_size=100, prefetch=prefetch)
    try:
        with pytest.raises(DataError) as error:
            next(stream)  # rows 0..3 only, but their row group holds row 5
    finally:
        stream.close()
    assert type(error.value) is DataError and str(error.value) == f"{path} row 5: {problem}"


def test_seq_len_different_from_the_rows(tmp_path):
    path = make_shards(tmp_path / "d", (16,)) / "part-0.parquet"  # rows of seq_len 8
    with pytest.raises(DataError) as error:
        read_batch(path.parent, 4, 16)
    hint = "so do all 8 rows of its row group: data for seq_len 8?"
    assert str(error.value) == f"{path} row 0: 9 tokens, expected seq_len + 1 = 17 ({hint})"


def test_bad_row_numbers_are_file_local(tmp_path):
    make_shards(tmp_path / "d", (8, 16))  # tokens of row g are 9g .. 9g + 8; the first ≥ 100 is in row 11
    with pytest.raises(DataError, match=r"part-1\.parquet row 3: token id 100 at position 1, expected in \["):
        first_batches(tmp_path / "d", vocab_size=100)
    assert len(first_batches(tmp_path / "d", vocab_size=9 * 24)) == 3
    write_rows(tmp_path / "neg" / "n.parquet", [OK] * 5 + [OK[:4] + [-7] + OK[:4]] + [OK] * 2)
    with pytest.raises(
        DataError, match=r"n\.parquet row 5: token id -7 at position 4, expected non-negative$"
    ):
        first_batches(tmp_path / "neg")


def test_missing_column(tmp_path):
    path = tmp_path / "d" / "x.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"tokens": pa.array([[1] * ROW_LEN] * 8)}), path)
    with pytest.raises(DataError, match=rf"{path}: no 'input_ids' column \(columns: \['tokens'\]\)"):
        TokenStream(path.parent, SEQ, 8, 8)


def test_wrong_column_type(tmp_path):
    path = tmp_path / "d" / "x.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"input_ids": pa.array(["text"] * 8)}), path)
    with pytest.raises(
        DataError, match=rf"{path}: column 'input_ids' has type string, expected a list of integers"
    ):
        read_batch(path.parent, 1, SEQ)


def test_empty_file(tmp_path):
    make_shards(tmp_path / "d", (8,))
    empty = write_rows(tmp_path / "d" / "z.parquet", [])
    with pytest.raises(DataError, match=rf"{empty}: file has no rows"):
        TokenStream(tmp_path / "d", SEQ, 8, 8)


@pytest.mark.parametrize("content", [b"", b"not a parquet file at all"])
def test_unreadable_file(tmp_path, content):
    make_shards(tmp_path / "d", (8,))
    broken = tmp_path / "d" / "broken.parquet"
    broken.write_bytes(content)
    with pytest.raises(DataError, match=rf"{broken}: unreadable parquet file"):
        TokenStream(tmp_path / "d", SEQ, 8, 8)


def test_no_files_match(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path}/nothing-\*\.parquet: no parquet files match this path"):
        TokenStream(f"{tmp_path}/nothing-*.parquet", SEQ, 8, 8)
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(DataError, match="empty-dir: no parquet files match"):
        read_batch(tmp_path / "empty-dir", 1, SEQ)


def test_a_missing_demo_corpus_names_the_command_that_builds_it(tmp_path):
    hint = f"; build the demo corpus there with `python -m pico.data.demo --root {tmp_path}`"
    with pytest.raises(DataError, match=f"{tmp_path}/demo/eval: no parquet files match this path{hint}$"):
        read_batch(tmp_path / "demo" / "eval", 1, SEQ)
    with pytest.raises(DataError, match=f"{tmp_path}/demos/eval: no parquet files match this path$"):
        read_batch(tmp_path / "demos" / "eval", 1, SEQ)


def test_error_surfaces_from_the_prefetch_thread_in_order(tmp_path):
    rows = [[1] * ROW_LEN for _ in range(24)]
    rows[20] = [1] * 3
    write_rows(tmp_path / "d" / "b.parquet", rows)
    stream = TokenStream(tmp_path / "d", SEQ, 8, 8, prefetch=2)
    next(stream), next(stream)  # row groups 0 and 1 are fine
    with pytest.raises(DataError, match="b.parquet row 20: 3 tokens"):
        next(stream)
    stream.close()


def test_corrupt_row_group_names_file_and_rows(tmp_path):
    path = write_rows(tmp_path / "d" / "c.parquet", [[i] * ROW_LEN for i in range(32)])
    chunk = pq.ParquetFile(path).metadata.row_group(2).column(0)
    data = bytearray(path.read_bytes())
    start, size = chunk.data_page_offset, chunk.total_compressed_size
    data[start : start + size] = b"\xff" * size
    path.write_bytes(bytes(data))  # the footer still reads: the damage shows when rows 16..23 are read
    with TokenStream(path.parent, SEQ, 8, 8, prefetch=0) as stream:
        next(stream), next(stream)
        with pytest.raises(DataError, match=rf"{path}: cannot read rows 16\.\.23 \(OSError: [^\n]*\)$"):
            next(stream)
