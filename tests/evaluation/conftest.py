"""Shared fixtures: invented documents in every task's real schema, a tiny BPE, a tiny exported pico model."""

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pico.data.demo import train_tokenizer
from pico.evaluation.choice import TRUTHFULQA_PRIMER
from pico.model import PicoDecoder, PicoDecoderConfig

SEQ_LEN = 128  # shorter than TruthfulQA's primer, so its left truncation is compared too
NAMES = ["Mara", "the old sailor", "a quiet baker", "two tall farmers", "the painter", "my neighbour"]
VERBS = ["carries", "paints", "finds", "lifts", "watches", "repairs", "sells", "hides"]
THINGS = [
    "a blue kettle",
    "the broken fence",
    "seven lanterns",
    "the wooden boat",
    "some fresh bread",
    "a map",
]
PLACES = [
    "near the harbour",
    "in the garden",
    "at dawn",
    "under the bridge",
    "behind the mill",
    "on the hill",
]


def sentence(rng: random.Random) -> str:
    """An invented sentence."""
    return f"{rng.choice(NAMES).capitalize()} {rng.choice(VERBS)} {rng.choice(THINGS)} {rng.choice(PLACES)}."


def blimp_docs(uid: str, field: str, n: int, rng: random.Random, pair_key: str = "pair_id") -> list[dict]:
    """Minimal pairs: the bad sentence breaks subject-verb agreement."""
    docs = []
    for i in range(n):
        good = sentence(rng)
        verb = next(v for v in VERBS if f" {v} " in good)
        docs.append(
            {
                "sentence_good": good,
                "sentence_bad": good.replace(f" {verb} ", f" {verb[:-1]} ", 1),
                "field": field,
                "linguistics_term": "agreement",
                "UID": uid,
                pair_key: i,
            }
        )
    return docs


def hellaswag_docs(n: int, rng: random.Random) -> list[dict]:
    """HellaSwag rows (label as the Hub's string), with the WikiHow [title]/[header] artifacts."""
    docs = []
    for i in range(n):
        endings = [sentence(rng).lower() for _ in range(4)]
        if i % 3 == 0:
            endings[1] = "[header] " + endings[1] + " [title] then rest"
        docs.append(
            {
                "ind": i,
                "activity_label": rng.choice(["Baking", "Sailing", "Painting a fence"]),
                "ctx_a": sentence(rng) + (" [title] Step one." if i % 4 == 0 else ""),
                "ctx_b": rng.choice(["then", "he", "she  slowly"]),
                "ctx": "",
                "endings": endings,
                "source_id": f"invented~{i}",
                "split": "val",
                "split_type": "indomain",
                "label": str(i % 4),
            }
        )
    return docs


def arc_docs(n: int, rng: random.Random) -> list[dict]:
    """ARC rows: 3 to 5 choices labelled A.. or 1.., answerKey among the labels."""
    docs = []
    for i in range(n):
        k = 3 + i % 3
        labels = [str(j + 1) for j in range(k)] if i % 4 == 3 else [chr(65 + j) for j in range(k)]
        docs.append(
            {
                "id": f"Invented_{i}",
                "question": f"Who {rng.choice(VERBS)} {rng.choice(THINGS)}?",
                "choices": {"text": [rng.choice(NAMES) for _ in range(k)], "label": labels},
                "answerKey": labels[i % k],
            }
        )
    return docs


def truthfulqa_docs(n: int, rng: random.Random) -> list[dict]:
    """TruthfulQA multiple_choice rows: mc1 has one true answer (first), mc2 several."""
    docs = []
    for i in range(n):
        mc1 = [sentence(rng) for _ in range(2 + i % 4)]
        mc2 = [sentence(rng) for _ in range(3 + i % 3)]
        docs.append(
            {
                "question": f"Where does {rng.choice(NAMES)} go {rng.choice(PLACES)}?",
                "mc1_targets": {"choices": mc1, "labels": [1] + [0] * (len(mc1) - 1)},
                "mc2_targets": {"choices": mc2, "labels": [1, 1] + [0] * (len(mc2) - 2)},
            }
        )
    return docs


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """Write one JSON object a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    """Write records as a parquet table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def texts_of(records: list[dict]) -> list[str]:
    """Every string in the records, for training the tokenizer."""
    out = []
    for r in records:
        for v in r.values():
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, list):
                out += [x for x in v if isinstance(x, str)]
            elif isinstance(v, dict):
                out += [x for xs in v.values() for x in xs if isinstance(x, str)]
    return out


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> dict:
    """Data files of every task, and the exported model dir (weights + tokenizer) of a tiny random decoder."""
    root = tmp_path_factory.mktemp("evaluation")
    rng = random.Random(0)
    blimp_a = blimp_docs("invented_agreement", "morphology", 14, rng)
    blimp_b = blimp_docs("invented_agreement_2", "syntax", 10, rng, pair_key="pairID")  # original BLiMP key
    hellaswag, arc_e, arc_c, tqa = (
        hellaswag_docs(20, rng),
        arc_docs(20, rng),
        arc_docs(12, rng),
        truthfulqa_docs(12, rng),
    )
    files = {
        "blimp": root / "blimp",
        "blimp_a": write_jsonl(root / "blimp" / "a.jsonl", blimp_a),
        "blimp_b": write_jsonl(root / "blimp" / "b.jsonl", blimp_b),
        "hellaswag": write_parquet(root / "hellaswag.parquet", hellaswag),
        "arc_easy": write_jsonl(root / "arc_easy.jsonl", arc_e),
        "arc_challenge": write_parquet(root / "arc_challenge.parquet", arc_c),
        "truthfulqa_mc1": write_jsonl(root / "truthfulqa.jsonl", tqa),
        "truthfulqa_mc2": root / "truthfulqa.jsonl",
    }
    texts = texts_of(blimp_a + blimp_b + hellaswag + arc_e + arc_c + tqa) + [TRUTHFULQA_PRIMER]
    tokenizer = train_tokenizer(texts, vocab_size=384)
    tokenizer.save(str(root / "tokenizer.json"))
    config = PicoDecoderConfig(
        d_model=32,
        n_layers=2,
        attention_n_heads=4,
        attention_n_kv_heads=2,
        activation_hidden_dim=64,
        vocab_size=tokenizer.get_vocab_size(),
        max_seq_len=SEQ_LEN,
    )
    torch.manual_seed(0)
    model = PicoDecoder(config)
    with torch.no_grad():  # larger weights than the init: confident, well-separated choices
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model_dir = root / "model"
    model.save_pretrained(model_dir, tokenizer=root / "tokenizer.json")
    return {"root": root, "model_dir": model_dir, "files": files}
