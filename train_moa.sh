#!/usr/bin/env bash
# Train the Mixture-of-LoRAs routers (train_moa.py) over the adapters in RUN/adapters.
#
# Usage: bash train_moa.sh [-h] [extra flags for train_moa.py ...]
#   MODEL=Qwen/Qwen2-0.5B TASKS=5tasks RUN=runs/qwen05 bash train_moa.sh --preset paper
#   bash train_moa.sh --preset demo --router block --eta 1
#
# Variables (environment overrides them; empty means the --preset's or the script's
# default): MODEL, TASKS, RUN, DATA, as in train_all_tasks.sh. Writes RUN/moa/ and prints
# the routing accuracy per task. NPROC=<n> trains data-parallel on n GPUs with torchrun.
# Extra arguments go to train_moa.py.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

MODEL=${MODEL:-}
TASKS=${TASKS:-}
RUN=${RUN:-runs/default}
DATA=${DATA:-}
NPROC=${NPROC:-1}

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

# -h: this header, then the flags of SCRIPT ($1) that extra arguments go to (never a traceback).
show_help() {
  sed -n "$2" "$0" | sed 's/^# \{0,1\}//'
  echo
  if ! has_packages; then
    echo "($1's flags need the project's Python: run 'bash setup.sh' first, or set PYTHON=...)"
  elif ! flags=$("$PYTHON" "$HERE/$1" -h 2>&1); then
    echo "(could not list $1's flags: $(tail -n 1 <<<"$flags"))"
  else
    echo "$flags"
  fi
}
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then show_help train_moa.py '2,11p'; exit 0; fi
has_packages || no_python

common=(--output-dir "$RUN")
if [[ -n "$MODEL" ]]; then common+=(--model "$MODEL"); fi
if [[ -n "$TASKS" ]]; then common+=(--tasks "$TASKS"); fi
case "$DATA" in
  "") ;;
  sample|hub) common+=(--data "$DATA") ;;
  *) common+=(--data dir --data-dir "$DATA") ;;
esac
launch=("$PYTHON")
if ((NPROC > 1)); then launch=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC"); fi
exec "${launch[@]}" "$HERE/train_moa.py" "${common[@]}" "$@"
