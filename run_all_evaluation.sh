#!/usr/bin/env bash
# Evaluate every method on every task of one run folder, then draw the plots.
#
# Usage: bash run_all_evaluation.sh [-h] [more full_evaluation.py flags ...]
#   e.g. MODEL=Qwen/Qwen2-1.5B RUN=runs/qwen2-1.5b DATA=hub bash run_all_evaluation.sh --eval-size 500
# Reads RUN/adapters/<task>/ and RUN/moa/; writes RUN/merged/, RUN/eval/ (table, summary, predictions)
# and RUN/plots/. Finished cells are reused on rerun (pass --force to recompute).
set -euo pipefail

MODEL="${MODEL:-smollm2-135m}"   # hub id, local HF folder, .gguf file or alias
TASKS="${TASKS:-5tasks}"         # comma-separated task names or a preset (5tasks, 7tasks)
RUN="${RUN:-runs/demo}"          # the run folder written by train_all_tasks.sh and train_moa.sh
DATA="${DATA:-sample}"           # sample | hub | a folder holding <task>/<split>.jsonl
METHODS="${METHODS:-moa,arrow,concat,weight_sum,svd,task_arithmetic,ties,dare_linear,dare_ties,knots,core_space,tsv,iso_c,lorahub}"  # + base, oracle
DENSITY="${DENSITY:-0.5}"         # share of entries TIES / DARE keep (the other methods ignore it)

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"   # the repository; paths stay relative to the caller
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

# The Python: $PYTHON when set, else the .venv next to this script (bash setup.sh), else `python`;
# it must have the project's packages (torch, transformers).
PYTHON_SET=${PYTHON:+1}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -e "$HERE/.venv/bin/python" ]]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON=python; fi
fi
has_packages() {
    "$PYTHON" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("torch") and u.find_spec("transformers")))' \
        >/dev/null 2>&1
}
no_python() {
    echo "error: no Python environment with the project's packages: run 'bash setup.sh' first (or set PYTHON=...)${PYTHON_SET:+ (PYTHON=$PYTHON cannot import torch and transformers)}" >&2
    exit 2
}
# How to open the notebook on run folder $1 with what this environment has installed.
notebook_hint() {
    local run py=$PYTHON nb=$HERE/visualize_lora.ipynb
    run=$(cd "$1" 2>/dev/null && pwd) || run=$1
    if [[ "$PWD" == "$HERE" ]]; then run=${run#"$HERE/"}; py=${py#"$HERE/"}; nb=visualize_lora.ipynb; fi
    if "$PYTHON" -m jupyter execute --version >/dev/null 2>&1; then
        echo "notebook: RUN_DIR=$run $py -m jupyter execute --output=$run/visualize_lora $nb   (writes $run/visualize_lora.ipynb with the figures)"
    else
        echo "notebook: $py -m pip install notebook, then RUN_DIR=$run $py -m jupyter notebook $nb"
    fi
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    echo
    echo "Variables (environment overrides): MODEL=$MODEL TASKS=$TASKS RUN=$RUN DATA=$DATA"
    echo "  METHODS=$METHODS DENSITY=$DENSITY PYTHON=$PYTHON"
    echo
    if ! has_packages; then
        echo "(full_evaluation.py's flags need the project's Python: run 'bash setup.sh' first, or set PYTHON=...)"
    elif ! flags=$("$PYTHON" "$HERE/full_evaluation.py" -h 2>&1); then
        echo "(could not list full_evaluation.py's flags: $(tail -n 1 <<<"$flags"))"
    else
        echo "$flags"
    fi
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
