#!/usr/bin/env bash
# LoRA-Mixer plug-regime sweep on 3 tasks (sentiment, nli, paraphrasing), real data, one thread.
cd /work/main
export OMP_NUM_THREADS=1
TASKS=sentiment,nli,paraphrasing
one() {   # one NAME ARGS...
  local name=$1; shift
  local run=runs/sweep/$name
  mkdir -p $run/adapters
  for t in ${TASKS//,/ }; do [[ -e $run/adapters/$t ]] || cp -r runs/reference/adapters/$t $run/adapters/$t; done
  [[ -f $run/compose/lora_mixer/routing.json || -f $run/compose/lora_mixer_finetune/routing.json ]] && return 0
  local t0=$SECONDS
  .venv/bin/python train_moa.py --model smollm2-135m --data-dir ../shared/data --tasks $TASKS --output-dir $run \
    --train-size 300 --eval-size 32 --max-len 320 --max-target-len 96 --batch-size 4 --seed 0 --no-progress \
    --system lora_mixer --mixer-top-k 3 "$@" > $run/train.log 2>&1
  echo "$name rc=$? $((SECONDS - t0)) s" >> runs/sweep/done.txt
}
one lr1e-2_s60     --lr 1e-2 --max-steps 60  --eval-every 30 --save-every 30
one lr1e-2_s60_old --lr 1e-2 --max-steps 60  --eval-every 30 --save-every 30 --mixer-modules attention --mixer-drop-uncovered --mixer-router-init linear
one lr3e-2_s60     --lr 3e-2 --max-steps 60  --eval-every 30 --save-every 30
one lr1e-3_s60     --lr 1e-3 --max-steps 60  --eval-every 30 --save-every 30
one lr1e-2_s180    --lr 1e-2 --max-steps 180 --eval-every 60 --save-every 60
one lr3e-2_s180    --lr 3e-2 --max-steps 180 --eval-every 60 --save-every 60
