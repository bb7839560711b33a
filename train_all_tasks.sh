#!/usr/bin/env bash
# Train one LoRA per task (train_individual_loras.py) for every task in TASKS.
#
# Usage: bash train_all_tasks.sh [-h] [extra flags for train_individual_loras.py ...]
#   MODEL=Qwen/Qwen2-0.5B TASKS=7tasks RUN=runs/qwen05 bash train_all_tasks.sh --preset paper
#   bash train_all_tasks.sh --preset demo                 # CPU demo (embedded SmolLM2-135M)
#
# Variables (environment overrides them; empty means the --preset's or the script's
# default): MODEL (hub id, folder, .gguf, smollm2-135m), TASKS (comma list or 5tasks /
# 7tasks), RUN (run folder), DATA (sample | hub | a folder of <task>/{train,validation}.jsonl).
# With several GPUs visible (nvidia-smi -L, limited by CUDA_VISIBLE_DEVICES) the tasks are
# spread over them, one process per GPU working through its share; otherwise they run one
# after another. Finished tasks are skipped on rerun; --resume continues interrupted ones,
# --force retrains. Extra arguments go to every train_individual_loras.py call. With --multitask
# it trains the one multitask adapter over TASKS instead (RUN/adapters/_multitask, one process).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

MODEL=${MODEL:-}
TASKS=${TASKS:-}
RUN=${RUN:-runs/default}
DATA=${DATA:-}

source "$HERE/drivers.sh"   # PYTHON, has_packages, no_python, show_help, notebook_hint

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then show_help train_individual_loras.py '2,15p'; exit 0; fi
has_packages || no_python

# Explicit flags beat a --preset in "$@"; flags later in "$@" beat these.
common=(--output-dir "$RUN")
if [[ -n "$MODEL" ]]; then common+=(--model "$MODEL"); fi
if [[ -n "$TASKS" ]]; then common+=(--tasks "$TASKS"); fi
case "$DATA" in
  "") ;;
  sample|hub) common+=(--data "$DATA") ;;
  *) common+=(--data dir --data-dir "$DATA") ;;
esac

# The task list the script will see (presets and flags resolved as it resolves them).
tasks_csv=$("$PYTHON" - "${common[@]}" "$@" <<'PY'
import sys
from src.cli import parse_configs
from src.config import PRESETS, DataConfig, TrainConfig
from src.errors import UserError
from src.lora import LoraConfig
from src.multitask import MultitaskConfig
from src.tasks import resolve_tasks
try:
    (data, _, _, _), _ = parse_configs(sys.argv[1:], "train_all_tasks.sh", "", DataConfig, TrainConfig, LoraConfig,
                                       MultitaskConfig, presets=PRESETS)
    print(",".join(resolve_tasks(data.tasks)))
except UserError as e:   # one line, exit 2 (as the training script itself would)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
PY
)
IFS=',' read -ra tasks <<< "$tasks_csv"

# The GPUs this script may use.
gpus=()
if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
  IFS=',' read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"
elif command -v nvidia-smi >/dev/null 2>&1; then
  n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  for ((i = 0; i < n; i++)); do gpus+=("$i"); done
fi
gpus=("${gpus[@]// /}")
if ((${#gpus[@]} > 0)) && [[ -z "${gpus[0]}" ]]; then gpus=(); fi

# --multitask (the last of --multitask / --no-multitask wins): one adapter over every task, one process.
multitask=""
for arg in "$@"; do
  case "$arg" in --multitask) multitask=1 ;; --no-multitask) multitask="" ;; esac
done

if [[ -n "$multitask" ]]; then
  echo "train_all_tasks: the multitask adapter over ${#tasks[@]} task(s) on ${gpus[0]:+GPU ${gpus[0]}}${gpus[0]:-the default device}"
  exec "$PYTHON" "$HERE/train_individual_loras.py" "${common[@]}" "$@"
fi
if ((${#gpus[@]} <= 1)); then
  echo "train_all_tasks: ${#tasks[@]} task(s) one after another on ${gpus[0]:+GPU ${gpus[0]}}${gpus[0]:-the default device}"
  exec "$PYTHON" "$HERE/train_individual_loras.py" "${common[@]}" "$@"
fi

# Several GPUs: GPU k trains tasks k, k+G, k+2G, ... in its own process.
echo "train_all_tasks: ${#tasks[@]} task(s) over ${#gpus[@]} GPUs (${gpus[*]})"
mkdir -p "$RUN/logs"
pids=()
for ((k = 0; k < ${#gpus[@]}; k++)); do
  share=()
  for ((j = k; j < ${#tasks[@]}; j += ${#gpus[@]})); do share+=("${tasks[j]}"); done
  ((${#share[@]})) || continue
  list=$(IFS=','; echo "${share[*]}")
  echo "  GPU ${gpus[k]}: $list (log: $RUN/logs/gpu${gpus[k]}.log)"
  CUDA_VISIBLE_DEVICES=${gpus[k]} "$PYTHON" "$HERE/train_individual_loras.py" "${common[@]}" "$@" --tasks "$list" \
    --no-progress > "$RUN/logs/gpu${gpus[k]}.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
if ((status)); then echo "train_all_tasks: a GPU's run failed; see $RUN/logs/" >&2; fi
exit "$status"
