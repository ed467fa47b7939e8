#!/usr/bin/env bash
# The accuracy runs recorded in docs/RESULTS.md: MAE pretraining, then fine-tuning, a linear probe and the same
# fine-tuning from scratch, each timed by benchmarks/time_to_accuracy.py.
#   DATA=/path/to/cifar10 PRE=80 FT=20 bash benchmarks/gpu_recipe.sh
# PRE_ARGS / FT_ARGS / LP_ARGS replace the flags of each phase (see the defaults below); LP is the probe's epochs.
# It ends with a table of the three runs (time_to_accuracy.py --summarize). PYTHON: the interpreter (python3).
set -euo pipefail
# the project, also where it is not installed (pip install -e .)
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
TTA="$(dirname "$0")/time_to_accuracy.py"
PYTHON=${PYTHON:-python3}
DATA=${DATA:-data}
RUNS=${RUNS:-runs/recipe}
PRE=${PRE:-80}
FT=${FT:-20}
LP=${LP:-5}
PRE_ARGS=${PRE_ARGS:-"--knn_every $((PRE / 2))"}
FT_ARGS=${FT_ARGS:-"--batch_size 512 --max_device_batch_size 512 --label_smoothing 0.1 --drop_path 0.1"}
LP_ARGS=${LP_ARGS:-"--batch_size 512 --max_device_batch_size 512 --weight_decay 0 --base_learning_rate 2e-3"}
runs() {  # runs [--check]: the three runs; --check parses and checks their flags and runs nothing
    "$PYTHON" "$TTA" "$@" --data_dir "$DATA" --out_dir "$RUNS/mae" --pretrain_epochs "$PRE" \
        --finetune_epochs "$FT" --pretrain_args "$PRE_ARGS" --finetune_args "$FT_ARGS --layer_decay 0.75"
    "$PYTHON" "$TTA" "$@" --data_dir "$DATA" --out_dir "$RUNS/linear-probe" \
        --pretrained_model_path "$RUNS/mae/mae.pth" --finetune_epochs "$LP" --finetune_args "--linear_probe $LP_ARGS"
    "$PYTHON" "$TTA" "$@" --data_dir "$DATA" --out_dir "$RUNS/scratch" --pretrain_epochs 0 \
        --finetune_epochs "$FT" --finetune_args "$FT_ARGS"
}
runs --check  # a bad flag in LP_ARGS ends the script now, not after the pretraining
runs
"$PYTHON" "$TTA" --summarize "$RUNS/mae" "$RUNS/linear-probe" "$RUNS/scratch"
