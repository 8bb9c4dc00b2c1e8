"""Raw text → shuffled parquet shards of seq_len + 1 tokens:
`python -m pico.data.prepare --input ... --out DIR`."""

import argparse
import glob
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from pico.data.shards import COLUMN, DataError
from pico.errors import exit_on
from pico.hf_http import configure_hf_http

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
SUFFIXES = (".txt", ".jsonl")  # the local inputs: a .txt file is one document, a .jsonl line one
WRITE_OPTIONS = dict(compression="zstd", compression_level=3, use_dictionary=False, write_statistics=False)
STATS_FILE = "stats.json"


def iter_documents(inputs: Iterable[str], text_column: str = "text", split: str = "train") -> Iterator[str]:
    """Documents of text inputs: a `.txt` file is one document, a `.jsonl` line one document
    (its `text_column`).

    Directories are searched recursively for `.txt`/`.jsonl`, globs expand (sorted); an input that is none of
    these is a `datasets` id, streamed with `datasets.load_dataset(input, split=split, streaming=True)`. Every
    bad input is a DataError naming the file and line (or the dataset).
    """
    for item in inputs:
        local = os.path.expanduser(os.path.expandvars(item))
        if os.path.isdir(local):
            files = sorted(str(p) for p in Path(local).rglob("*") if p.suffix in SUFFIXES and p.is_file())
        elif glob.has_magic(local):
            files = sorted(glob.glob(local, recursive=True))
        elif os.path.isfile(local):
            files = [local]
        elif Path(local).suffix in SUFFIXES or item.startswith((".", "/", "~")) or item.count("/") > 1:
            raise DataError(f"{item}: no such file or directory")
        else:
            yield from _dataset_documents(item, split, text_column)
            continue
        if not files:
            raise DataError(f"{item}: no .txt or .jsonl files here")
        for file in files:
            yield from _file_documents(file, text_column)


def _file_documents(file: str, text_column: str) -> Iterator[str]:
    """The documents of one .txt or .jsonl file."""
    if not file.endswith(SUFFIXES):
        raise DataError(f"{file}: unsupported input (expected .txt or .jsonl)")
    try:
        text = Path(file).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise DataError(f"{file}: cannot read ({e.strerror})") from None
    if file.endswith(".txt"):
        yield text
        return
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{file}: line {line_no} is not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_column), str):
            raise DataError(f"{file}: line {line_no} has no string field '{text_column}'")
        yield record[text_column]


def _dataset_documents(name: str, split: str, text_column: str) -> Iterator[str]:
    """The `text_column` of each row of split `split` of `datasets` id `name`, streamed."""
    import datasets

    configure_hf_http()  # timeouts, quiet retries
    try:
        rows = iter(datasets.load_dataset(name, split=split, streaming=True))
    except Exception as e:  # an unknown id, offline, no permission: datasets raises many types
        first = " ".join(str(e).split())
        raise DataError(
            f"{name}: no such file, and not a dataset that loads ({type(e).__name__}: {first})"
        ) from None
    try:  # close the iterator deterministically: half-read streams can hang pyarrow at exit (datasets #7467)
        for i, row in enumerate(rows):
            if not isinstance(row.get(text_column), str):
                raise DataError(
                    f"{name} ({split}) row {i}: no string field '{text_column}' (has {sorted(row)})"
                )
            yield row[text_column]
    finally:
        rows.close()


def split_documents(n_documents: int, eval_fraction: float, seed: int) -> set[int]:
    """Indices of the held-out eval documents: round(f·n) of them (≥ 1 if f > 0), drawn with `seed`."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = max(1, round(eval_fraction * n_documents)) if eval_fraction > 0 else 0
    if n_eval >= n_documents and n_eval:
        raise DataError(f"eval_fraction={eval_fraction} of {n_documents} documents leaves none for training")
    return set(np.random.default_rng(seed).permutation(n_documents)[:n_eval].tolist())


def eos_id(tokenizer: Tokenizer, eos: str | None = None) -> int:
    """Id of the end-of-document token: `eos` if given, else the first of EOS_CANDIDATES in the vocabulary."""
    for token in (eos,) if eos else EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise DataError(f"tokenizer has no end-of-document token {eos or EOS_CANDIDATES}; pass --eos TOKEN")


def chunk(documents: list[np.ndarray], eos: int, row_len: int) -> tuple[np.ndarray, int]:
    """Concatenate documents with EOS after each, cut into rows of `row_len`;
    returns (rows, dropped tokens)."""
    stream = np.concatenate([np.append(d, eos) for d in documents] or [[]]).astype(np.int32)
    n_rows = len(stream) // row_len
    return stream[: n_rows * row_len].reshape(n_rows, row_len), len(stream) - n_rows * row_len


def unigram_entropy(rows: np.ndarray, vocab_size: int) -> float:
    """Entropy in nats per token of the token frequencies in `rows`: −Σ p·ln p."""
    p = np.bincount(rows.ravel(), minlength=vocab_size) / rows.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def write_shards(
    rows: np.ndarray, out: Path, prefix: str, shards: int, row_group_size: int = 256
) -> list[Path]:
    """Write `rows` (N, L) as `shards` parquet files `<prefix>-0000i-of-0000K.parquet`,
    `input_ids` list<int32>."""
    if len(rows) < shards:
        raise DataError(f"{out}: {len(rows)} rows cannot fill {shards} shards; use fewer shards or more text")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(np.array_split(rows, shards)):
        offsets = pa.array(np.arange(len(part) + 1, dtype=np.int32) * rows.shape[1])
        column = pa.ListArray.from_arrays(offsets, pa.array(part.ravel(), type=pa.int32()))
        paths.append(out / f"{prefix}-{i:05d}-of-{shards:05d}.parquet")
        pq.write_table(pa.table({COLUMN: column}), paths[-1], row_group_size=row_group_size, **WRITE_OPTIONS)
    return paths


def load_stats(path: str | Path) -> dict | None:
    """The `stats.json` written by `prepare` in a shard directory (or next to a shard file), else None."""
    path = Path(os.path.expanduser(os.path.expandvars(str(path))))
    stats = (path if path.is_dir() else path.parent) / STATS_FILE
    return json.loads(stats.read_text()) if stats.is_file() else None


def tokenize(documents: Iterable[str], tok: Tokenizer, batch_documents: int = 256) -> list[np.ndarray]:
    """Token ids of each document (int32, no special tokens), encoded in batches; progress on stderr."""
    tokens, n_tokens, batch, started = [], 0, [], time.perf_counter()
    reported = started

    def flush(final: bool = False) -> None:
        nonlocal n_tokens, reported
        for encoding in tok.encode_batch(batch, add_special_tokens=False):
            tokens.append(np.asarray(encoding.ids, dtype=np.int32))
            n_tokens += len(encoding.ids)
        batch.clear()
        now = time.perf_counter()
        if final or now - reported > 2.0:
            reported, rate = now, n_tokens / max(now - started, 1e-9)
            print(
                f"prepare: {len(tokens)} documents, {n_tokens} tokens, {rate:,.0f} tokens/s", file=sys.stderr
            )

    for text in documents:
        batch.append(text)
        if len(batch) == batch_documents:
            flush()
    flush(final=True)
    return tokens


def prepare_dataset(
    documents: Iterable[str],
    tokenizer: str | Path,
    seq_len: int,
    out: str | Path,
    shards: int = 1,
    seed: int = 0,
    eval_fraction: float = 0.0,
    eval_shards: int = 1,
    eos: str | None = None,
    row_group_size: int = 256,
    batch_documents: int = 256,
) -> dict:
    """Tokenize documents, hold out whole documents for eval, and write `<out>/train`
    (and `<out>/eval`) shards.

    Each split: documents in input order, EOS appended to each, concatenated, cut into rows of
    seq_len + 1 tokens (remainder dropped), rows shuffled with `seed`, written as parquet with
    `tokenizer.json` and `stats.json`. Returns the stats of each split, {"train": {...}, "eval": {...}}.
    Bad input (documents, tokenizer, rows, output) is a DataError; a failed write removes what it wrote.
    """
    out, tokenizer_path = Path(out), Path(tokenizer)
    _check_output(out)
    tok = load_tokenizer(tokenizer_path)
    eos_token, vocab_size = eos_id(tok, eos), tok.get_vocab_size(with_added_tokens=True)
    tokens = tokenize(documents, tok, batch_documents)
    held_out = split_documents(len(tokens), eval_fraction, seed)
    splits = {"train": [t for i, t in enumerate(tokens) if i not in held_out]}
    if held_out:
        splits["eval"] = [t for i, t in enumerate(tokens) if i in held_out]
    n_shards, stats, rows = {"train": shards, "eval": eval_shards}, {}, {}
    for k, (split, docs) in enumerate(splits.items()):
        rows[split], dropped = chunk(docs, eos_token, seq_len + 1)
        rows[split] = rows[split][np.random.default_rng([seed, k]).permutation(len(rows[split]))]
        if len(rows[split]) < n_shards[split]:
            raise DataError(
                f"{out / split}: {len(rows[split])} rows cannot fill {n_shards[split]} shards; use fewer "
                "shards or more text"
            )
        stats[split] = {
            "documents": len(docs),
            "rows": len(rows[split]),
            "seq_len": seq_len,
            "tokens": int(rows[split].size),
            "dropped_tokens": dropped,
            "vocab_size": vocab_size,
            "eos_id": eos_token,
            "seed": seed,
            "unigram_entropy_nats": unigram_entropy(rows[split], vocab_size),
        }
    for i, split in enumerate(splits):
        try:
            _write_split(
                out / split, rows[split], n_shards[split], stats[split], tokenizer_path, row_group_size
            )
        except DataError:
            for written in list(splits)[:i]:  # the train split, when eval's write failed
                shutil.rmtree(out / written, ignore_errors=True)
            raise
    return stats


def _write_split(folder: Path, rows: np.ndarray, shards: int, stats: dict, tokenizer: Path, row_group_size):
    """One split's shards, tokenizer.json and stats.json in `folder`; a write that fails (a full disk, an
    output that cannot be written) removes the folder and is a DataError naming it."""
    try:
        write_shards(rows, folder, folder.name, shards, row_group_size)
        shutil.copyfile(tokenizer, folder / "tokenizer.json")
        (folder / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    except OSError as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise DataError(f"{folder}: cannot write the shards ({e.strerror or e})") from None
    print(
        f"prepare: {folder.name}: {stats['documents']} documents → {stats['rows']} rows of "
        f"{stats['seq_len'] + 1} tokens ({stats['dropped_tokens']} dropped) in {folder}",
        file=sys.stderr,
    )


def _check_output(out: Path) -> None:
    """Raise a DataError unless `out` can hold the splits: no shards there yet, and its nearest existing
    folder a directory."""
    for split in ("train", "eval"):
        if list((out / split).glob("*.parquet")):
            raise DataError(f"{out / split}: already holds parquet shards; write to an empty --out")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise DataError(f"{out}: cannot write there ({existing} is a file, not a directory)")


def load_tokenizer(path: Path) -> Tokenizer:
    """The `tokenizers` tokenizer in JSON file `path`; a DataError naming the file when there is none."""
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for JSON it cannot read
        raise DataError(f"{path}: not a tokenizers file ({' '.join(str(e).split())})") from None


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m pico.data.prepare --input ... --tokenizer tokenizer.json --seq-len N --out DIR`."""
    p = argparse.ArgumentParser(prog="python -m pico.data.prepare", description=__doc__)
    p.add_argument(
        "--input", nargs="+", required=True, help=".txt/.jsonl files, dirs, globs, or a datasets id"
    )
    p.add_argument("--tokenizer", required=True, help="tokenizers JSON file (copied next to the shards)")
    p.add_argument("--seq-len", type=int, required=True, help="rows hold seq_len + 1 tokens")
    p.add_argument("--out", required=True, help="writes OUT/train (and OUT/eval) shards")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-fraction", type=float, default=0.0, help="fraction of documents held out for eval")
    p.add_argument("--eval-shards", type=int, default=1)
    p.add_argument("--eos", default=None, help=f"end-of-document token (default: first of {EOS_CANDIDATES})")
    p.add_argument("--text-column", default="text", help="field of .jsonl records / dataset rows")
    p.add_argument("--split", default="train", help="split of a datasets id")
    p.add_argument("--row-group-size", type=int, default=256)
    args = p.parse_args(argv)
    if args.seq_len < 1 or args.shards < 1 or args.eval_shards < 1 or args.row_group_size < 1:
        p.error("--seq-len, --shards, --eval-shards and --row-group-size must be ≥ 1")
    with exit_on():  # bad input: one line `data error: ...`, exit code 2
        prepare_dataset(
            iter_documents(args.input, args.text_column, args.split),
            args.tokenizer,
            args.seq_len,
            args.out,
            args.shards,
            args.seed,
            args.eval_fraction,
            args.eval_shards,
            args.eos,
            args.row_group_size,
        )


if __name__ == "__main__":
    main()
