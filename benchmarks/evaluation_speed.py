"""pico's task scorer vs lm-evaluation-harness (HFLM) on one exported model and the same documents, and the
cost of one evaluation relative to one training step.

Documents are invented HellaSwag-schema and BLiMP-schema rows; both sides read the same local files, the
harness through its own task YAMLs. Median of --reps runs; accuracies must be equal. CPU, fp32.

    python benchmarks/evaluation_speed.py --preset tiny --vocab-size 8192 --seq-len 256 --docs 100 --reps 3
"""

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
import lm_eval
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from pico.data.demo import train_tokenizer
from pico.evaluation import TaskSpec, evaluate_tasks, load_tasks
from pico.model import PicoDecoder, PicoDecoderConfig

WORDS = [
    "the",
    "a",
    "sailor",
    "baker",
    "farmer",
    "painter",
    "kettle",
    "fence",
    "lantern",
    "boat",
    "bread",
    "map",
    "harbour",
    "garden",
    "bridge",
    "mill",
    "hill",
    "carries",
    "paints",
    "finds",
    "lifts",
    "watches",
    "repairs",
    "sells",
    "hides",
    "quietly",
    "slowly",
    "near",
    "under",
    "behind",
    "at",
    "on",
    "in",
]


def sentence(rng: random.Random, n: int) -> str:
    """An invented sentence of n words."""
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_documents(folder: Path, docs: int) -> dict[str, Path]:
    """`docs` HellaSwag rows and 2·`docs` BLiMP pairs as jsonl."""
    rng = random.Random(0)
    hellaswag = [
        {
            "activity_label": "Sailing",
            "ctx_a": sentence(rng, 25),
            "ctx_b": "then",
            "label": str(i % 4),
            "endings": [sentence(rng, rng.randint(8, 20)) for _ in range(4)],
        }
        for i in range(docs)
    ]
    blimp = []
    for i in range(2 * docs):
        good = sentence(rng, rng.randint(6, 14))
        blimp.append(
            {
                "sentence_good": good,
                "sentence_bad": good[::-1],
                "field": "syntax",
                "UID": "invented",
                "linguistics_term": "order",
                "pair_id": i,
            }
        )
    files = {"hellaswag": folder / "hellaswag.jsonl", "blimp": folder / "blimp.jsonl"}
    for name, rows in (("hellaswag", hellaswag), ("blimp", blimp)):
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def harness_configs(folder: Path, files: dict[str, Path]) -> None:
    """The harness's hellaswag and blimp YAMLs pointed at the local files."""
    tasks = Path(lm_eval.__file__).parent / "tasks"
    for name, yaml, split_key, split in (
        ("h_hellaswag", "hellaswag/hellaswag.yaml", "validation_split", "validation"),
        ("h_blimp", "blimp/_template_yaml", "validation_split", "train"),
    ):
        file = files[name[2:]]
        (folder / f"{name}.yaml").write_text(
            f"include: {tasks / yaml}\ntask: {name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {file}\ntraining_split: null\ntest_split: null\n"
            f"{split_key}: {split}\n"
        )


def median_time(fn, reps: int):
    """Median wall time of `reps` calls and the last result."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main():
    """Build the model and documents, time both scorers and a training step, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--docs", type=int, default=100, help="HellaSwag docs (4 requests each); BLiMP gets 2× pairs"
    )
    parser.add_argument(
        "--harness-batch-sizes", default="1,32", help="HFLM batch sizes to time (1 is its default)"
    )
    parser.add_argument(
        "--train-batch", type=int, default=32, help="rows of one training step (demo config: 32)"
    )
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pico_eval_bench_"))
    files = write_documents(work, args.docs)
    texts = [line for f in files.values() for line in f.read_text().splitlines()]
    train_tokenizer(texts, args.vocab_size).save(str(work / "tokenizer.json"))
    config = PicoDecoderConfig.preset(args.preset)
    config = PicoDecoderConfig(
        **{**config.to_dict(), "vocab_size": args.vocab_size, "max_seq_len": args.seq_len}
    )
    torch.manual_seed(0)
    model = PicoDecoder(config)
    model.save_pretrained(work / "model", tokenizer=work / "tokenizer.json")
    harness_configs(work, files)
    cpu = torch.device("cpu")
    specs = [TaskSpec("hellaswag", str(files["hellaswag"])), TaskSpec("blimp", str(files["blimp"]))]
    print(
        f"preset={args.preset} vocab={args.vocab_size} seq={args.seq_len} hellaswag docs={args.docs} "
        f"blimp pairs={2 * args.docs} reps={args.reps} threads={torch.get_num_threads()} "
        f"torch={torch.__version__} "
        f"lm_eval={lm_eval.__version__}"
    )

    def pico_run():
        return evaluate_tasks(model, load_tasks(specs, work / "model", args.seq_len), cpu)

    pico_time, ours = median_time(pico_run, args.reps)
    rows = [("pico (load + score)", "auto", pico_time, ours)]
    for batch in map(int, args.harness_batch_sizes.split(",")):
        lm = HFLM(pretrained=str(work / "model"), device="cpu", dtype="float32", batch_size=batch)
        manager = TaskManager(include_path=str(work), include_defaults=False)
        seconds, out = median_time(
            lambda lm=lm, manager=manager: simple_evaluate(
                model=lm, tasks=["h_hellaswag", "h_blimp"], task_manager=manager, verbosity="ERROR"
            ),
            args.reps,
        )
        theirs = out["results"]
        assert theirs["h_hellaswag"]["acc,none"] == ours["hellaswag"]["acc"], "hellaswag acc differs"
        assert theirs["h_hellaswag"]["acc_norm,none"] == ours["hellaswag"]["acc_norm"], (
            "hellaswag acc_norm differs"
        )
        assert theirs["h_blimp"]["acc,none"] == ours["blimp"]["acc"], "blimp acc differs"
        rows.append((f"lm-eval HFLM batch {batch}", str(batch), seconds, ours))

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab_size, (args.train_batch, args.seq_len + 1))

    def train_step():
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    train_step()  # warm-up
    step_time, _ = median_time(train_step, args.reps)

    print(
        f"scores: hellaswag acc {ours['hellaswag']['acc']:.4f} "
        f"acc_norm {ours['hellaswag']['acc_norm']:.4f} | "
        f"blimp acc {ours['blimp']['acc']:.4f} (equal in every harness run)\n"
    )
    print(f"{'scorer':<24} {'batch':>6} {'seconds':>9} {'vs pico':>8} {'train steps':>12}")
    for name, batch, seconds, _ in rows:
        print(
            f"{name:<24} {batch:>6} {seconds:>9.2f} {seconds / pico_time:>7.2f}x {seconds / step_time:>12.1f}"
        )
    print(f"\none training step ({args.train_batch}×{args.seq_len} tokens, fwd+bwd+AdamW): {step_time:.3f} s")


if __name__ == "__main__":
    main()
