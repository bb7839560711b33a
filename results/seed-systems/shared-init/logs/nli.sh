#!/usr/bin/env bash
# nli from Text-to-LoRA (hidden 512, shared library): a training description against the held-out ones
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=.venv/bin/python
EVAL=(--model smollm2-135m --data-dir ../shared/data --eval-size 30 --batch-size 16 --max-new-tokens 96 --max-prompt-len 320 --density 0.5 --seed 0)
descs=("train0|Decide whether a premise entails, contradicts, or is neutral towards a hypothesis."
       "heldout1|Assess the inferential relationship between two short texts."
       "heldout2|Say if a conclusion is guaranteed, ruled out, or left open by a premise.")
for d in "${descs[@]}"; do
  name=${d%%|*}; text=${d#*|}
  R=runs/nli-$name; rm -rf $R; mkdir -p $R/adapters
  $PY -m src.t2l generate --run runs/shared512 --description "$text" --out $R/adapters/nli
  cp runs/shared/adapters/nli/training_config.json $R/adapters/nli/   # its selection_ids: the same 30 examples are evaluated
  $PY full_evaluation.py "${EVAL[@]}" --output-dir $R --tasks nli --methods oracle --reuse-from runs/shared > runs/exp/logs/nli-$name.log 2>&1 &
  if [[ $name == heldout1 ]]; then wait; fi
done
wait
