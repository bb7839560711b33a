#!/usr/bin/env bash
# The reference experiment (README "Results"): SmolLM2-135M-Instruct on the real data subsets,
# 7 tasks, and the 5-task set on the same adapters with its own MoA and merges (as the study).
#
#   bash run_reference.sh                          # about 2.5 h on 2 CPU cores; DATA=../shared/data
#   DATA=/my/data RUN=runs/ref WORKERS=1 bash run_reference.sh
#   MODEL=HF_FOLDER TRAIN_SIZE=500 EVAL_SIZE=200 bash run_reference.sh
#
# DATA is any folder of <task>/{train,validation}.jsonl. WORKERS processes (default 2, one
# CPU thread each) share every stage: the tasks' trainings, the two MoAs, and the cells of
# each evaluation (full_evaluation.py processes on one run folder split its cells). Writes
# $RUN (7 tasks) and $RUN-5tasks, each with eval/results.md, plots/ and logs/ (appended to).
# Rerunning reuses whatever is finished.
set -euo pipefail
cd "$(dirname "$0")"
HERE=$PWD
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi

source "$HERE/drivers.sh"   # PYTHON, has_packages, no_python, show_help, notebook_hint
DATA=${DATA:-../shared/data}
RUN=${RUN:-runs/reference}
RUN5=${RUN5:-$RUN-5tasks}
WORKERS=${WORKERS:-2}
MODEL=${MODEL:-smollm2-135m}
TRAIN_SIZE=${TRAIN_SIZE:-300}   # training examples per task
EVAL_SIZE=${EVAL_SIZE:-100}     # validation examples per task evaluated
has_packages || no_python
[[ -d "$DATA" ]] || { echo "error: DATA=$DATA is not a folder of <task>/{train,validation}.jsonl" >&2; exit 2; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( WORKERS > 1 ? 1 : 2 ))}
mkdir -p "$RUN/logs" "$RUN5/logs"

# Sizes (README "Results" states them): TRAIN_SIZE examples per task, one epoch, the adapter
# kept at its best validation loss (32 validation examples, every 25 steps).
TRAIN=(--model "$MODEL" --output-dir "$RUN" --data-dir "$DATA" --train-size "$TRAIN_SIZE" --eval-size 32
       --max-len 320 --max-target-len 96 --epochs 1 --batch-size 4 --lr 3e-4 --warmup-steps 5
       --eval-every 25 --patience 2 --save-every 25 --seed 0 --no-progress)
MOA=(--model "$MODEL" --data-dir "$DATA" --train-size "$TRAIN_SIZE" --eval-size 32 --max-len 320
     --max-steps 60 --batch-size 8 --lr 1e-2 --eval-every 30 --save-every 30 --seed 0 --no-progress)
EVAL=(--model "$MODEL" --data-dir "$DATA" --eval-size "$EVAL_SIZE" --batch-size 16 --max-new-tokens 96
      --max-prompt-len 320 --density 0.5 --seed 0)
METHODS=${METHODS:-moa,concat,weight_sum,svd,svd_sum,ties,dare_linear,dare_ties,concat_unscaled,weight_avg}
TASKS5=summarization,translation,qa,sentiment,nli

# in_parallel LOG CMD1 -- CMD2 -- ...: the commands WORKERS at a time, each logging to LOG.k
in_parallel() {
  local log=$1 k=0 cmd=() pids=()
  shift
  while (($#)); do
    cmd=()
    while (($#)) && [[ $1 != -- ]]; do cmd+=("$1"); shift; done
    (($#)) && shift
    k=$((k + 1))
    "${cmd[@]}" >>"$log.$k.log" 2>&1 &
    pids+=($!)
    if ((${#pids[@]} >= WORKERS)); then wait "${pids[0]}" || { echo "error: see $log.*.log" >&2; exit 1; }; pids=("${pids[@]:1}"); fi
  done
  for p in "${pids[@]}"; do wait "$p" || { echo "error: see $log.*.log" >&2; exit 1; }; done
}

start=$SECONDS
stamp() { echo "[$(( (SECONDS - start) / 60 )) min] $*"; }

stamp "1/4 one LoRA per task (7 tasks) -> $RUN/adapters"
if ((WORKERS > 1)); then
  in_parallel "$RUN/logs/train" "$PYTHON" train_individual_loras.py "${TRAIN[@]}" --tasks summarization,sentiment,nli \
    -- "$PYTHON" train_individual_loras.py "${TRAIN[@]}" --tasks qa,translation,paraphrasing,commonsense
else
  in_parallel "$RUN/logs/train" "$PYTHON" train_individual_loras.py "${TRAIN[@]}" --tasks 7tasks
fi
for t in ${TASKS5//,/ }; do   # the 5-task set reuses the 7-task adapters
  [[ -e "$RUN5/adapters/$t" ]] || { mkdir -p "$RUN5/adapters"; cp -r "$RUN/adapters/$t" "$RUN5/adapters/$t"; }
done

stamp "2/4 MoA routers -> $RUN/moa, $RUN5/moa"
in_parallel "$RUN/logs/moa" "$PYTHON" train_moa.py "${MOA[@]}" --output-dir "$RUN" --tasks 7tasks \
  -- "$PYTHON" train_moa.py "${MOA[@]}" --output-dir "$RUN5" --tasks "$TASKS5"

stamp "3/4 evaluation, 7 tasks: base, oracle, $METHODS"
cmds=()
for ((w = 1; w <= WORKERS; w++)); do
  cmds+=("$PYTHON" full_evaluation.py "${EVAL[@]}" --output-dir "$RUN" --tasks 7tasks --methods "$METHODS" --)
done
in_parallel "$RUN/logs/eval" "${cmds[@]}"

stamp "4/4 evaluation, 5 tasks (base and oracle taken from the 7-task run)"
cmds=()
for ((w = 1; w <= WORKERS; w++)); do
  cmds+=("$PYTHON" full_evaluation.py "${EVAL[@]}" --output-dir "$RUN5" --tasks "$TASKS5" --methods "$METHODS"
         --reuse-from "$RUN" --)
done
in_parallel "$RUN5/logs/eval" "${cmds[@]}"

"$PYTHON" -m src.analysis "$RUN" "$RUN5" > "$RUN/logs/analysis.log"
stamp "done"
cat "$RUN/eval/results.md" "$RUN5/eval/results.md"
echo "plots: $RUN/plots/, $RUN5/plots/"
notebook_hint "$RUN"
