#!/usr/bin/env bash
# Issue 25's real-data rows on the shared-init 5-task library (runs/shared5).
set -uo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=.venv/bin/python
D=../shared/data
TRAIN=(--model smollm2-135m --data-dir $D --train-size 300 --eval-size 32 --max-len 320 --max-target-len 96 --epochs 1
       --batch-size 4 --lr 3e-4 --warmup-steps 5 --eval-every 25 --patience 2 --save-every 25 --seed 0 --no-progress)
EVAL=(--model smollm2-135m --data-dir $D --eval-size 30 --batch-size 16 --max-new-tokens 96 --max-prompt-len 320 --density 0.5 --seed 0)
L=runs/exp25/logs; mkdir -p $L
lane1() {
  $PY train_individual_loras.py "${TRAIN[@]}" --tasks 5tasks --output-dir runs/shared5 --multitask > $L/multitask.log 2>&1
  $PY full_evaluation.py "${EVAL[@]}" --output-dir runs/shared5 --tasks 5tasks --methods multitask_lora > $L/eval-multitask.log 2>&1
  echo lane1 done >> $L/done.txt
}
lane2() {
  $PY full_evaluation.py "${EVAL[@]}" --output-dir runs/shared5 --tasks 5tasks --methods smile > $L/eval-smile.log 2>&1
  $PY full_evaluation.py "${EVAL[@]}" --output-dir runs/shared5 --tasks 5tasks --methods lorahub --lorahub-budget 40 > $L/eval-lorahub.log 2>&1
  $PY full_evaluation.py "${EVAL[@]}" --output-dir runs/shared5 --tasks 5tasks --methods random_merge --random-draws 5 > $L/eval-random.log 2>&1
  mkdir -p runs/shared5-r64/adapters; cp -rn runs/shared5/adapters/{summarization,translation,qa,sentiment,nli} runs/shared5-r64/adapters/
  $PY full_evaluation.py "${EVAL[@]}" --output-dir runs/shared5-r64 --tasks 5tasks --methods retrieval --retrieval-shots 64 --reuse-from runs/shared5 > $L/eval-retrieval64.log 2>&1
  echo lane2 done >> $L/done.txt
}
lane1 & lane2 & wait
