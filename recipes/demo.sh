#!/usr/bin/env bash
# The main job, offline: build the Shakespeare demo corpus (once), pretrain the demo model on it with
# learning-dynamics capture through ./torchrun.sh (2 CPU processes, or every GPU), analyse the run, and
# say where everything is.
#   bash recipes/demo.sh [section.key=value ...]   (overrides go to recipes/pretrain.py)
# RUN_DIR (default runs/demo) is the run directory, PICO_CACHE (default ~/.cache/pico) holds the corpus.
set -euo pipefail
case "${1:-}" in
  -h | --help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' && exit 0 ;;
esac
cd "$(dirname "$0")/.."
export PICO_CACHE=${PICO_CACHE:-$HOME/.cache/pico}
RUN_DIR=${RUN_DIR:-runs/demo}
DEMO=$PICO_CACHE/demo

echo "== 1/3 demo corpus ($DEMO)"
python3 -m pico.data.demo --root "$PICO_CACHE"

echo "== 2/3 pretraining ($RUN_DIR)"
./torchrun.sh recipes/pretrain.py --config recipes/configs/demo.yaml checkpointing.run_dir="$RUN_DIR" \
  data.path="$DEMO/train" learning_dynamics.eval_data="$DEMO/eval" evaluation.data="$DEMO/eval" "$@"

echo "== 3/3 analysis"
python3 recipes/analyze.py --run "$RUN_DIR" --plot

python3 - "$RUN_DIR" "$DEMO" <<'PY'
import json, sys
from pathlib import Path
from pico.data import load_stats
run, demo = Path(sys.argv[1]), Path(sys.argv[2])
step = (run / "checkpoints" / "latest").read_text().strip()
evals = json.loads((run / "checkpoints" / step / "eval.json").read_text())
result = evals.get("paloma") or evals["perplexity"]  # runs before pico 0.2 wrote "perplexity"
entropy = load_stats(demo / "eval")["unigram_entropy_nats"]
print(f"\nheld-out loss at {step}: {result['loss']:.3f} nats/token (perplexity {result['perplexity']:.1f}); "
      f"unigram entropy of the held-out text: {entropy:.3f} nats/token")
print(f"tensorboard:  tensorboard --logdir {run}")
print(f"checkpoints:  {run / 'checkpoints'} (model/ loads with transformers.AutoModelForCausalLM)")
for csv in sorted((run / "analysis").glob("*/metrics.csv")):
    print(f"metrics:      {csv}")
    pngs = sorted((csv.parent / "plots").glob("*.png"))
    if pngs:
        print(f"plots:        {csv.parent / 'plots'}/ ({len(pngs)} PNGs, e.g. {pngs[0].name})")
PY
