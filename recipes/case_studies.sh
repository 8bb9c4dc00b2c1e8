#!/usr/bin/env bash
# The paper's two case studies on the offline demo corpus, at CPU-friendly sizes: a base run, a ReLoRA run
# and a MAML run from the same seed, data order and model shape, then the plots that compare them
# (docs/case_studies.md).   bash recipes/case_studies.sh [section.key=value ...]   (overrides go to all three)
# BLIMP=<jsonl/parquet file or folder in the BLiMP dataset's schema> adds BLiMP accuracy at every checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
export PICO_CACHE=${PICO_CACHE:-$HOME/.cache/pico}
ROOT=${ROOT:-runs/case_studies}
DEMO=$PICO_CACHE/demo

echo "== demo corpus ($DEMO)"
python3 -m pico.data.demo --root "$PICO_CACHE"

# The same data, seed and shape for all three: maml-demo.yaml's vocabulary has room for the mask token.
common=(data.path="$DEMO/train" learning_dynamics.eval_data="$DEMO/eval" evaluation.data="$DEMO/eval"
        model.vocab_size=8256)
evals=(paloma/perplexity)
if [ -n "${BLIMP:-}" ]; then
  common+=("evaluation.tasks=[{name: blimp, path: $BLIMP}]")
  evals+=(blimp/acc)
fi
for run in base:pretrain:demo relora:relora:relora-demo maml:maml:maml-demo; do
  IFS=: read -r name recipe config <<<"$run"
  echo "== $name: recipes/$recipe.py ($ROOT/$name)"
  ./torchrun.sh "recipes/$recipe.py" --config "recipes/configs/$config.yaml" \
    checkpointing.run_dir="$ROOT/$name" "${common[@]}" "$@"
done

echo "== comparison"
spec=(name=case_studies data_types=[weights,gradients] splits=[eval]
      "metrics=[per, condition_number]" "components=[attention.v_proj, attention.o_proj]"
      "evals=[$(IFS=,; echo "${evals[*]}")]")
python3 recipes/analyze.py --run "$ROOT/base" --run "$ROOT/relora" --run "$ROOT/maml" --plot "${spec[@]}"
echo
echo "plots:  $ROOT/base/analysis/case_studies/plots/runs/ (one line per run)"
echo "table:  $ROOT/*/analysis/case_studies/metrics.csv"
