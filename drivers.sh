# Shared by the shell drivers (sourced after HERE is set to the repository): which Python to
# use, a one-line refusal when it lacks the project's packages, -h text, the notebook hint.
#
# The Python: $PYTHON when set, else the .venv next to the drivers (bash setup.sh), else
# `python`; it must have the project's packages (torch, transformers).
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

# -h: the driver's header (sed range $2 of $0), $HELP_EXTRA if set, then the flags of SCRIPT ($1) that extra
# arguments go to (never a traceback).
show_help() {
  sed -n "$2" "$0" | sed 's/^# \{0,1\}//'
  echo
  if [[ -n "${HELP_EXTRA:-}" ]]; then echo "$HELP_EXTRA"; echo; fi
  if ! has_packages; then
    echo "($1's flags need the project's Python: run 'bash setup.sh' first, or set PYTHON=...)"
  elif ! flags=$("$PYTHON" "$HERE/$1" -h 2>&1); then
    echo "(could not list $1's flags: $(tail -n 1 <<<"$flags"))"
  else
    echo "$flags"
  fi
}

# How to open the notebook on run folder $1 with what this environment has installed.
notebook_hint() {
  local run py=$PYTHON nb=$HERE/visualize_lora.ipynb
  run=$(cd "$1" 2>/dev/null && pwd) || run=$1
  if [[ "$PWD" == "$HERE" ]]; then run=${run#"$HERE/"}; py=${py#"$HERE/"}; nb=visualize_lora.ipynb; fi
  local qrun qpy qnb qout   # quoted for the shell, so that a path with spaces can be pasted as printed
  qrun=$(printf '%q' "$run"); qpy=$(printf '%q' "$py"); qnb=$(printf '%q' "$nb"); qout=$(printf '%q' "$run/visualize_lora")
  if "$PYTHON" -m jupyter execute --version >/dev/null 2>&1; then
    echo "notebook: RUN_DIR=$qrun $qpy -m jupyter execute --output=$qout $qnb   (writes $run/visualize_lora.ipynb with the figures)"
  else
    echo "notebook: $qpy -m pip install notebook, then RUN_DIR=$qrun $qpy -m jupyter notebook $qnb"
  fi
}
