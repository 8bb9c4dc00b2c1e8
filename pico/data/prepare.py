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

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
WRITE_OPTIONS = dict(compression="zstd", compression_level=3, use_dictionary=False, write_statistics=False)
STATS_FILE = "stats.json"


def iter_documents(inputs: Iterable[str], text_column: str = "text", split: str = "train") -> Iterator[str]:
    """Documents of text inputs: a `.txt` file is one document, a `.jsonl` line one document
    (its `text_column`).

    Directories are searched recursively for `.txt`/`.jsonl`, globs expand (sorted); an input that is none of
    these is a `datasets` id, streamed with `datasets.load_dataset(input, split=split, streaming=True)`.
    """
    for item in inputs:
        local = os.path.expanduser(os.path.expandvars(item))
        if os.path.isdir(local):
            files = sorted(str(p) for p in Path(local).rglob("*") if p.suffix in (".txt", ".jsonl"))
        elif glob.has_magic(local):
            files = sorted(glob.glob(local, recursive=True))
        elif os.path.isfile(local):
            files = [local]
        else:
            yield from _dataset_documents(item, split, text_column)
            continue
        if not files:
            raise DataError(f"{item}: no .txt or .jsonl files here")
        for file in files:
            yield from _file_documents(file, text_column)


def _file_documents(file: str, text_column: str) -> Iterator[str]:
    if file.endswith(".txt"):
        yield Path(file).read_text(encoding="utf-8")
    elif file.endswith(".jsonl"):
        with open(file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record.get(text_column), str):
                        raise DataError(f"{file}: line {line_no} has no string field '{text_column}'")
                    yield record[text_column]
    else:
        raise DataError(f"{file}: unsupported input (expected .txt or .jsonl)")


def _dataset_documents(name: str, split: str, text_column: str) -> Iterator[str]:
    import datasets

    rows = iter(datasets.load_dataset(name, split=split, streaming=True))
    try:  # close the iterator deterministically: half-read streams can hang pyarrow at exit (datasets #7467)
        for row in rows:
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
    """
    out, tokenizer_path = Path(out), Path(tokenizer)
    for split in ("train", "eval"):
        if list((out / split).glob("*.parquet")):
            raise DataError(f"{out / split}: already holds parquet shards; write to an empty --out")
    if not tokenizer_path.is_file():
        raise DataError(f"{tokenizer_path}: tokenizer file not found")
    tok = Tokenizer.from_file(str(tokenizer_path))
    eos_token, vocab_size = eos_id(tok, eos), tok.get_vocab_size(with_added_tokens=True)
    tokens = tokenize(documents, tok, batch_documents)
    held_out = split_documents(len(tokens), eval_fraction, seed)
    splits = {"train": [t for i, t in enumerate(tokens) if i not in held_out]}
    if held_out:
        splits["eval"] = [t for i, t in enumerate(tokens) if i in held_out]
    stats = {}
    for k, (split, docs) in enumerate(splits.items()):
        rows, dropped = chunk(docs, eos_token, seq_len + 1)
        rows = rows[np.random.default_rng([seed, k]).permutation(len(rows))]
        write_shards(rows, out / split, split, shards if split == "train" else eval_shards, row_group_size)
        shutil.copyfile(tokenizer_path, out / split / "tokenizer.json")
        stats[split] = {
            "documents": len(docs),
            "rows": len(rows),
            "seq_len": seq_len,
            "tokens": int(rows.size),
            "dropped_tokens": dropped,
            "vocab_size": vocab_size,
            "eos_id": eos_token,
            "seed": seed,
            "unigram_entropy_nats": unigram_entropy(rows, vocab_size),
        }
        (out / split / STATS_FILE).write_text(json.dumps(stats[split], indent=2) + "\n")
        print(
            f"prepare: {split}: {len(docs)} documents → {len(rows)} rows of {seq_len + 1} tokens "
            f"({dropped} dropped) in {out / split}",
            file=sys.stderr,
        )
    return stats


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
