#!/usr/bin/env bash
# after sweep.sh: the labelled variant (per-token task-label CE), and the gradient diagnostic
cd /work/main
while pgrep -f "runs/sweep/lr1e-2_s180" >/dev/null; do sleep 20; done; echo "lr1e-2_s180 done" >> runs/sweep/done.txt
source <(sed -n '/^one()/,/^}/p' runs/sweep/sweep.sh)
TASKS=sentiment,nli,paraphrasing
export OMP_NUM_THREADS=1
one lr1e-2_s60_eta1 --lr 1e-2 --max-steps 60 --eval-every 30 --save-every 30 --mixer-label-weight 1
.venv/bin/python bench/mixer_signal.py runs/sweep/lr1e-2_s60 > runs/sweep/signal_zero.txt 2>&1
.venv/bin/python bench/mixer_signal.py runs/sweep/lr1e-2_s60 --routers runs/sweep/lr1e-2_s180/compose/lora_mixer > runs/sweep/signal_s180.txt 2>&1
echo "signal done" >> runs/sweep/done.txt
