#!/usr/bin/env bash
# The case-study protocol (docs/case_studies.md) on the offline demo corpus: base, ReLoRA and MAML pretraining,
# each on a learning-rate grid and several seeds, then two controls at their arm's selected lr: `blocklr`, the
# base with its attention and SwiGLU matrices at BLOCK_LR_RATIO of the lr (ReLoRA's learning-rate allocation,
# at ReLoRA's lr), and `maml-noclip`, MAML without gradient clipping as published (at MAML's lr). Then the
# comparison (recipes/case_studies.py, all CSVs in ROOT/comparison): the grid's table, each arm at its own lr
# (the lowest mean held-out loss over seeds), one recipes/analyze.py call with a group per arm (groups.csv,
# band plots), and the Pico paper's two claims tested.
#   bash recipes/case_studies.sh [section.key=value ...]
# (the overrides go to every run; the sizes below, the lr and the seed are the protocol's and win)
# Sizes (environment variables; the defaults are the full protocol):
#   ROOT=runs/case_studies  STEPS=80  SAVE_EVERY=8  LRS="1e-3 3e-3 1e-2"  SEEDS="0 1 2"
#   ARMS="base relora maml"  CONTROLS="blocklr maml-noclip"  BLOCK_LR_RATIO=0.4  BATCH=8  MICRO=4  EVAL_BATCHES=4
#   WARMUP=STEPS/10  RESET_EVERY=STEPS/3 (ReLoRA's merges)  NPROC_PER_NODE (torchrun.sh's: 2 on CPU)
#   SPIKE_WINDOW=10  SPIKE_THRESHOLD=3 (claim b's loss spikes: pico.spikes.SpikeDetector on train/loss)
# BLIMP=<jsonl/parquet file or folder in the BLiMP dataset's schema> adds BLiMP accuracy at every checkpoint.
# A seed s sets training.seed=s (initial weights, MAML's episodes, ReLoRA's resets) and data.shuffle_seed=s.
# Rerunning continues: a finished run (checkpoints/latest = step_STEPS) is skipped, an unfinished one resumes
# from its latest checkpoint, and the comparison is written again. One ROOT holds one protocol's sizes.
# The full protocol is 3 arms x 3 lrs x 3 seeds + 2 controls x 3 seeds = 33 runs of 80 steps: 53 minutes
# on a shared 2-core CPU machine and 19 GB of checkpoints (docs/case_studies.md, "What the protocol shows").
set -euo pipefail
cd "$(dirname "$0")/.."
export PICO_CACHE=${PICO_CACHE:-$HOME/.cache/pico}
ROOT=${ROOT:-runs/case_studies}
STEPS=${STEPS:-80}
SAVE_EVERY=${SAVE_EVERY:-8}
LRS=${LRS:-1e-3 3e-3 1e-2}
SEEDS=${SEEDS:-0 1 2}
ARMS=${ARMS:-base relora maml}
CONTROLS=${CONTROLS-blocklr maml-noclip}
BLOCK_LR_RATIO=${BLOCK_LR_RATIO:-0.4}
BATCH=${BATCH:-8}
EVAL_BATCHES=${EVAL_BATCHES:-4}
MICRO=${MICRO:-4}
SPIKE_WINDOW=${SPIKE_WINDOW:-10}
SPIKE_THRESHOLD=${SPIKE_THRESHOLD:-3}
WARMUP=${WARMUP:-$((STEPS / 10))}
RESET_EVERY=${RESET_EVERY:-$((STEPS / 3 > 0 ? STEPS / 3 : 1))}
DEMO=$PICO_CACHE/demo
RUNS=$ROOT/runs

declare -A RECIPE=([base]=pretrain [relora]=relora [blocklr]=pretrain [maml]=maml [maml-noclip]=maml)
declare -A CONFIG=([base]=demo [relora]=relora-demo [blocklr]=demo [maml]=maml-demo [maml-noclip]=maml-demo)
declare -A PARENT=([blocklr]=relora [maml-noclip]=maml) # a control runs at its parent arm's selected lr
declare -A ARM_ARGS=(
  [base]=""
  [relora]="relora.reset_every=$RESET_EVERY relora.restart_warmup_steps=$((RESET_EVERY / 10))"
  [blocklr]="training.block_lr_ratio=$BLOCK_LR_RATIO"
  [maml]=""
  [maml-noclip]="training.grad_clip=null"
)
for arm in $ARMS; do
  [ -n "${RECIPE[$arm]+set}" ] && [ -z "${PARENT[$arm]+set}" ] ||
    { echo "case_studies.sh: unknown arm '$arm' (known: base relora maml)" >&2; exit 2; }
done
for arm in $CONTROLS; do
  [ -n "${PARENT[$arm]+set}" ] ||
    { echo "case_studies.sh: unknown control '$arm' (known: ${!PARENT[*]})" >&2; exit 2; }
  [[ " $ARMS " == *" ${PARENT[$arm]} "* ]] ||
    { echo "case_studies.sh: control '$arm' needs its arm '${PARENT[$arm]}' in ARMS" >&2; exit 2; }
done

echo "== demo corpus ($DEMO)"
python3 -m pico.data.demo --root "$PICO_CACHE"

# The same data, model shape and schedule for every arm: maml-demo.yaml's vocabulary has room for the mask
# token. A non-finite loss skips its update (train/nonfinite_steps) so that every run of the grid finishes.
common=(data.path="$DEMO/train" learning_dynamics.eval_data="$DEMO/eval" evaluation.data="$DEMO/eval"
        model.vocab_size=8256)
sizes=(training.max_steps="$STEPS" training.warmup_steps="$WARMUP" checkpointing.save_every="$SAVE_EVERY"
       data.batch_size="$BATCH" data.micro_batch_size="$MICRO" learning_dynamics.eval_batch_size=16
       "learning_dynamics.metrics=[]"
       evaluation.max_batches="$EVAL_BATCHES" training.nan_policy=skip logging.log_every=1)
evals=(paloma/perplexity paloma/loss)
if [ -n "${BLIMP:-}" ]; then
  common+=("evaluation.tasks=[{name: blimp, path: $BLIMP}]")
  evals+=(blimp/acc)
fi

train() { # ARM LR [overrides...]: the arm at LR for every seed, each run skipped when finished
  local arm=$1 lr=$2 seed run t0
  shift 2
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
}

start=$SECONDS
for arm in $ARMS; do
  for lr in $LRS; do
    train "$arm" "$lr" "$@"
  done
done
python3 recipes/case_studies.py select "$ROOT"
for arm in $CONTROLS; do
  train "$arm" "$(python3 recipes/case_studies.py lr "$ROOT" "${PARENT[$arm]}")" "$@"
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
python3 recipes/case_studies.py claims "$ROOT" --spike-window "$SPIKE_WINDOW" --spike-threshold "$SPIKE_THRESHOLD"
first=$(python3 -c "import glob, sys; print(sorted(glob.glob(sys.argv[1]))[0])" "${groups[1]#*=}")
rm -rf "$ROOT/comparison/plots"  # analyze.py writes the groups into the first group's first run: copied
cp "$first/analysis/case_studies/groups.csv" "$ROOT/comparison/"
cp -r "$first/analysis/case_studies/plots/groups" "$ROOT/comparison/plots"
echo
echo "tables:  $ROOT/comparison/tables.md (grid, selected, groups, claim_a, claim_b, episodes: .csv)"
echo "plots:   $ROOT/comparison/plots/ (each arm's mean over seeds, its 95% t-interval a band)"
echo "total:   $((SECONDS - start)) s"
