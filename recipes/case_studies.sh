#!/usr/bin/env bash
# The case-study protocol (docs/case_studies.md) on the offline demo corpus: base, ReLoRA and MAML pretraining,
# each on a learning-rate grid and several seeds, next to two controls: `blocklr`, the base with its attention
# and SwiGLU matrices at BLOCK_LR_RATIO of the learning rate (ReLoRA's learning-rate allocation), and
# `maml-noclip`, MAML without gradient clipping (as published). Then the comparison: the grid's table, each
# arm at its own lr (the lowest mean held-out loss over seeds), one recipes/analyze.py call with a group per
# arm (groups.csv, band plots), and the Pico paper's two claims tested (recipes/case_studies.py).
#   bash recipes/case_studies.sh [section.key=value ...]
# (the overrides go to every run; the sizes below, the lr and the seed are the protocol's and win)
# Sizes (environment variables; the defaults are the full protocol):
#   ROOT=runs/case_studies  STEPS=150  SAVE_EVERY=10  LRS="1e-3 3e-3 6e-3"  SEEDS="0 1 2"
#   ARMS="base relora blocklr maml maml-noclip"  BLOCK_LR_RATIO=0.4  EVAL_BATCHES=8
#   WARMUP=STEPS/10  RESET_EVERY=STEPS/3 (ReLoRA's merges)  NPROC_PER_NODE (torchrun.sh's: 2 on CPU)
# BLIMP=<jsonl/parquet file or folder in the BLiMP dataset's schema> adds BLiMP accuracy at every checkpoint.
# A seed s sets training.seed=s (initial weights, MAML's episodes, ReLoRA's resets) and data.shuffle_seed=s.
# Rerunning continues: a finished run (checkpoints/latest = step_STEPS) is skipped, an unfinished one resumes
# from its latest checkpoint, and the comparison is written again. One ROOT holds one protocol's sizes.
# The full protocol is 5 arms x 3 lrs x 3 seeds = 45 runs of 150 steps: about 3 hours on 2 CPU cores
# (docs/case_studies.md, "Cost"), and about 16 GB of checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
export PICO_CACHE=${PICO_CACHE:-$HOME/.cache/pico}
ROOT=${ROOT:-runs/case_studies}
STEPS=${STEPS:-150}
SAVE_EVERY=${SAVE_EVERY:-10}
LRS=${LRS:-1e-3 3e-3 6e-3}
SEEDS=${SEEDS:-0 1 2}
ARMS=${ARMS:-base relora blocklr maml maml-noclip}
BLOCK_LR_RATIO=${BLOCK_LR_RATIO:-0.4}
EVAL_BATCHES=${EVAL_BATCHES:-8}
WARMUP=${WARMUP:-$((STEPS / 10))}
RESET_EVERY=${RESET_EVERY:-$((STEPS / 3 > 0 ? STEPS / 3 : 1))}
DEMO=$PICO_CACHE/demo
RUNS=$ROOT/runs

declare -A RECIPE=([base]=pretrain [relora]=relora [blocklr]=pretrain [maml]=maml [maml-noclip]=maml)
declare -A CONFIG=([base]=demo [relora]=relora-demo [blocklr]=demo [maml]=maml-demo [maml-noclip]=maml-demo)
declare -A ARM_ARGS=(
  [base]=""
  [relora]="relora.reset_every=$RESET_EVERY relora.restart_warmup_steps=$((RESET_EVERY / 10))"
  [blocklr]="training.block_lr_ratio=$BLOCK_LR_RATIO"
  [maml]=""
  [maml-noclip]="training.grad_clip=null"
)
for arm in $ARMS; do
  [ -n "${RECIPE[$arm]+set}" ] || { echo "case_studies.sh: unknown arm '$arm' (known: ${!RECIPE[*]})" >&2; exit 2; }
done

echo "== demo corpus ($DEMO)"
python3 -m pico.data.demo --root "$PICO_CACHE"

# The same data, model shape and schedule for every arm: maml-demo.yaml's vocabulary has room for the mask
# token. A non-finite loss skips its update (train/nonfinite_steps) so that every run of the grid finishes.
common=(data.path="$DEMO/train" learning_dynamics.eval_data="$DEMO/eval" evaluation.data="$DEMO/eval"
        model.vocab_size=8256)
sizes=(training.max_steps="$STEPS" training.warmup_steps="$WARMUP" checkpointing.save_every="$SAVE_EVERY"
       evaluation.max_batches="$EVAL_BATCHES" training.nan_policy=skip)
evals=(paloma/perplexity paloma/loss)
if [ -n "${BLIMP:-}" ]; then
  common+=("evaluation.tasks=[{name: blimp, path: $BLIMP}]")
  evals+=(blimp/acc)
fi
start=$SECONDS
for arm in $ARMS; do
  for lr in $LRS; do
    for seed in $SEEDS; do
      run=$RUNS/${arm}_lr${lr}_s${seed}
      if [ "$(cat "$run/checkpoints/latest" 2>/dev/null)" = "step_$STEPS" ]; then
        echo "== $arm lr $lr seed $seed: done ($run)"
        continue
      fi
      echo "== $arm lr $lr seed $seed: recipes/${RECIPE[$arm]}.py ($run)"
      t0=$SECONDS
      # shellcheck disable=SC2086 # ARM_ARGS holds whole overrides separated by spaces
      ./torchrun.sh "recipes/${RECIPE[$arm]}.py" --config "recipes/configs/${CONFIG[$arm]}.yaml" \
        checkpointing.run_dir="$run" "${common[@]}" "$@" "${sizes[@]}" training.lr="$lr" \
        training.seed="$seed" data.shuffle_seed="$seed" ${ARM_ARGS[$arm]}
      echo "== $arm lr $lr seed $seed: $((SECONDS - t0)) s"
    done
  done
done
echo "== training: $((SECONDS - start)) s"

echo "== comparison ($ROOT/comparison)"
python3 recipes/case_studies.py select "$ROOT"
groups=()
while IFS=, read -r arm lr _; do
  groups+=(--group "$arm=$RUNS/${arm}_lr${lr}_s*")
done < <(tail -n +2 "$ROOT/comparison/selected.csv")
spec=(name=case_studies data_types=[weights,gradients] splits=[eval]
      "metrics=[per, condition_number]" "components=[attention.v_proj, attention.o_proj]"
      "evals=[$(IFS=,; echo "${evals[*]}")]")
python3 recipes/analyze.py --plot "${groups[@]}" "${spec[@]}"
python3 recipes/case_studies.py claims "$ROOT"
first=$(python3 -c "import glob, sys; print(sorted(glob.glob(sys.argv[1]))[0])" "${groups[1]#*=}")
echo
echo "tables:  $ROOT/comparison/tables.md (grid.csv, selected.csv, claim_a.csv, claim_b.csv)"
echo "groups:  $first/analysis/case_studies/groups.csv and plots/groups/ (the first group's first run)"
echo "total:   $((SECONDS - start)) s"
