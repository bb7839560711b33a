#!/usr/bin/env bash
# Evaluate every method on every task of one run folder, then draw the plots.
#
# Usage: bash run_all_evaluation.sh [-h] [more full_evaluation.py flags ...]
#   e.g. MODEL=Qwen/Qwen2-1.5B RUN=runs/qwen2-1.5b DATA=hub bash run_all_evaluation.sh --eval-size 500
# Reads RUN/adapters/<task>/ and RUN/moa/ (and RUN/compose/lora_mixer*/, RUN/adapters/_multitask/ when
# present: their methods join the default list); writes RUN/merged/, RUN/eval/ (table, summary, predictions)
# and RUN/plots/. Finished cells are reused on rerun (pass --force to recompute).
set -euo pipefail

MODEL="${MODEL:-smollm2-135m}"   # hub id, local HF folder, .gguf file or alias
TASKS="${TASKS:-5tasks}"         # comma-separated task names or a preset (5tasks, 7tasks)
RUN="${RUN:-runs/demo}"          # the run folder written by train_all_tasks.sh and train_moa.sh
DATA="${DATA:-sample}"           # sample | hub | a folder holding <task>/<split>.jsonl
METHODS_SET="${METHODS:-}"     # given by the caller: used as it is
METHODS="${METHODS:-moa,arrow,smile,retrieval,concat,weight_sum,svd,task_arithmetic,ties,dare_linear,dare_ties,knots,core_space,tsv,iso_c,lorahub,random_merge}"  # + base, oracle
DENSITY="${DENSITY:-0.5}"         # share of entries TIES / DARE keep (the other methods ignore it)

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"   # the repository; paths stay relative to the caller
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

source "$HERE/drivers.sh"   # PYTHON, has_packages, no_python, show_help, notebook_hint

# the trained systems beside MoA join the default list when the run folder has them
for mixer in lora_mixer lora_mixer_finetune lora_mixer_joint; do
    if [[ -z "${METHODS_SET:-}" && -f "$RUN/compose/$mixer/mixer_config.json" ]]; then METHODS="$METHODS,$mixer"; fi
done
# ... and the multitask baseline (train_individual_loras.py --multitask)
if [[ -z "${METHODS_SET:-}" && -f "$RUN/adapters/_multitask/adapter_config.json" ]]; then METHODS="$METHODS,multitask_lora"; fi

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    HELP_EXTRA="Variables (environment overrides): MODEL=$MODEL TASKS=$TASKS RUN=$RUN DATA=$DATA
  METHODS=$METHODS DENSITY=$DENSITY PYTHON=$PYTHON"
    show_help full_evaluation.py '2,8p'
    exit 0
fi
has_packages || no_python

if [[ -d "$DATA" ]]; then
    data_flags=(--data dir --data-dir "$DATA")
else
    data_flags=(--data "$DATA")
fi

"$PYTHON" "$HERE/full_evaluation.py" --model "$MODEL" --output-dir "$RUN" --tasks "$TASKS" --methods "$METHODS" \
    --density "$DENSITY" "${data_flags[@]}" "$@"
"$PYTHON" -m src.analysis "$RUN"
echo "table: $RUN/eval/results.md   plots: $RUN/plots/"
notebook_hint "$RUN"
