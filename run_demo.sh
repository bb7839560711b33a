#!/usr/bin/env bash
# The whole pipeline on a CPU: the embedded SmolLM2-135M-Instruct and the bundled sample
# data (data/sample: a tiny hand-written set; the numbers it gives make no research claim).
#
#   bash run_demo.sh            # after `bash setup.sh`; about 6 minutes on 2 free CPU cores (README)
#   RUN=runs/mine TASKS=sentiment,nli bash run_demo.sh
#
# Trains one LoRA per task, trains the MoA routers, evaluates base / oracle / MoA / every
# merge, writes the table and the plots, and prints the table. Rerunning reuses what is
# finished (adapters, router, evaluation cells). PYTHON=... picks the interpreter (default:
# .venv/bin/python, which setup.sh makes).
set -euo pipefail
cd "$(dirname "$0")"
HERE=$PWD
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi

source "$HERE/drivers.sh"   # PYTHON, has_packages, no_python, show_help, notebook_hint
has_packages || no_python
export PYTHON
export MODEL=${MODEL:-smollm2-135m}
export TASKS=${TASKS:-5tasks}
export RUN=${RUN:-runs/demo}
export DATA=${DATA:-sample}
export METHODS=${METHODS:-moa,concat,weight_sum,svd,svd_sum,ties,dare_ties}

# Each stage says what it should take on 2 free cores (this project's reference machine, README
# "What the demo prints"); with the cores busy elsewhere it takes longer.
start=$SECONDS
stage_start=$SECONDS
minsec() { echo "$(( $1 / 60 )) min $(( $1 % 60 )) s"; }
stage() {   # N TITLE EXPECTED: the stage's header line
  stage_start=$SECONDS
  echo "== $1/3 $2 (about $3 on 2 free cores; started at $(minsec $(( SECONDS - start ))))"
}
stage_done() { echo "== stage done in $(minsec $(( SECONDS - stage_start )))"; }

stage 1 "training one LoRA per task ($TASKS) on $MODEL" "2 min 10 s"
bash train_all_tasks.sh --preset demo
stage_done
stage 2 "training the MoA routers" "1 min"
bash train_moa.sh --preset demo
stage_done
stage 3 "evaluating base, oracle and $METHODS" "2 min 30 s"
# prints the table (once), then where the table, the plots and the notebook are
bash run_all_evaluation.sh --eval-size 12 --batch-size 12 --max-new-tokens 32
stage_done
echo
echo "demo finished in $(minsec $(( SECONDS - start )))"
