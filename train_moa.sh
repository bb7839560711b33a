#!/usr/bin/env bash
# Train the Mixture-of-LoRAs routers (train_moa.py) over the adapters in RUN/adapters.
#
# Usage: bash train_moa.sh [-h] [extra flags for train_moa.py ...]
#   MODEL=Qwen/Qwen2-0.5B TASKS=5tasks RUN=runs/qwen05 bash train_moa.sh --preset paper
#   bash train_moa.sh --preset demo --router block --eta 1
#   SYSTEM=lora_mixer bash train_moa.sh --preset demo     # LoRA-Mixer, into RUN/compose/lora_mixer
#
# Variables (environment overrides them; empty means the --preset's or the script's
# default): MODEL, TASKS, RUN, DATA, as in train_all_tasks.sh; SYSTEM: moa (RUN/moa/) or
# lora_mixer (RUN/compose/lora_mixer/). Prints the routing per task. NPROC=<n> trains data-parallel on n GPUs with torchrun.
# Extra arguments go to train_moa.py.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

MODEL=${MODEL:-}
TASKS=${TASKS:-}
RUN=${RUN:-runs/default}
DATA=${DATA:-}
SYSTEM=${SYSTEM:-}
NPROC=${NPROC:-1}

source "$HERE/drivers.sh"   # PYTHON, has_packages, no_python, show_help, notebook_hint

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then show_help train_moa.py '2,11p'; exit 0; fi
has_packages || no_python

common=(--output-dir "$RUN")
if [[ -n "$MODEL" ]]; then common+=(--model "$MODEL"); fi
if [[ -n "$TASKS" ]]; then common+=(--tasks "$TASKS"); fi
if [[ -n "$SYSTEM" ]]; then common+=(--system "$SYSTEM"); fi
case "$DATA" in
  "") ;;
  sample|hub) common+=(--data "$DATA") ;;
  *) common+=(--data dir --data-dir "$DATA") ;;
esac
launch=("$PYTHON")
if ((NPROC > 1)); then launch=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC"); fi
exec "${launch[@]}" "$HERE/train_moa.py" "${common[@]}" "$@"
