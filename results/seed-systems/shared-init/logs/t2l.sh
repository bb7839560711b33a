#!/usr/bin/env bash
# Issue 24's remaining Text-to-LoRA measurements on the shared-A-init library (runs/shared).
set -uo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=.venv/bin/python
D=../shared/data
T2L=(--model smollm2-135m --data-dir $D --tasks 7tasks --max-steps 600 --batch-size 9 --lr 1e-3 --eval-every 100 --save-every 100 --seed 0 --no-progress)
EVAL=(--model smollm2-135m --data-dir $D --eval-size 30 --batch-size 16 --max-new-tokens 96 --max-prompt-len 320 --density 0.5 --seed 0)
for r in shared512 sharedsft; do mkdir -p runs/$r/adapters; cp -rn runs/shared/adapters/* runs/$r/adapters/; done
rm -rf runs/sharedsft/adapters/{paraphrasing,commonsense}
L=runs/exp/logs; mkdir -p $L
lane1() {
  $PY train_text_to_lora.py "${T2L[@]}" --output-dir runs/shared > $L/t2l256.log 2>&1
  $PY train_text_to_lora.py --model smollm2-135m --data-dir $D --tasks 5tasks --objective sft --train-size 300 --eval-size 32 \
     --max-len 320 --max-target-len 96 --batch-size 4 --max-steps 200 --lr 1e-4 --eval-every 50 --save-every 50 --seed 0 \
     --no-progress --output-dir runs/sharedsft > $L/t2lsft.log 2>&1
  $PY full_evaluation.py "${EVAL[@]}" --output-dir runs/shared --tasks 7tasks --methods t2l --reuse-from results/reference/7tasks > $L/eval-256.log 2>&1
  $PY full_evaluation.py "${EVAL[@]}" --output-dir runs/sharedsft --tasks 5tasks --methods t2l --reuse-from runs/shared results/reference/5tasks > $L/eval-sft.log 2>&1
  echo lane1 done >> $L/done.txt
}
lane2() {
  $PY full_evaluation.py "${EVAL[@]}" --output-dir runs/shared --tasks 7tasks --methods oracle --reuse-from results/reference/7tasks > $L/eval-oracle.log 2>&1
  $PY full_evaluation.py "${EVAL[@]}" --output-dir runs/shared --tasks 7tasks --methods retrieval > $L/eval-retrieval7.log 2>&1
  $PY train_text_to_lora.py "${T2L[@]}" --t2l-hidden 512 --output-dir runs/shared512 > $L/t2l512.log 2>&1
  $PY full_evaluation.py "${EVAL[@]}" --output-dir runs/shared512 --tasks 7tasks --methods t2l --reuse-from runs/shared results/reference/7tasks > $L/eval-512.log 2>&1
  mkdir -p runs/shared5/adapters; cp -rn runs/shared/adapters/{summarization,translation,qa,sentiment,nli} runs/shared5/adapters/
  $PY full_evaluation.py "${EVAL[@]}" --output-dir runs/shared5 --tasks 5tasks --methods oracle,retrieval --reuse-from runs/shared > $L/eval-retrieval5.log 2>&1
  echo lane2 done >> $L/done.txt
}
lane1 & lane2 & wait
