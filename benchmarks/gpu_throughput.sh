#!/usr/bin/env bash
# The fast path's throughput measurements that docs/RESULTS.md reports or still lacks, in one go on a GPU box.
# Each stage prints its JSON lines, prefixed by a "# stage" line, and appends them to $OUT_DIR/STAGE.jsonl.
#   bash benchmarks/gpu_throughput.sh                      # every stage (not yet timed on a GPU; each run compiles)
#   STAGES="profile autotune" bash benchmarks/gpu_throughput.sh
#   EXTRA="--preset tiny" STAGES=crop bash benchmarks/gpu_throughput.sh   # EXTRA: more flags for every run
# PYTHON: the interpreter (python3).
# Stages:
#   profile    pretraining at micro-batch 1024: where the device time of a step goes (+ Chrome traces)
#   autotune   pretraining with torch.compile's max-autotune-no-cudagraphs (Triton GEMM templates)
#   graphs     fine-tuning at batch 128 in the default mode and with CUDA graphs (reduce-overhead)
#   randaug    fine-tuning at batch 512 without and with device RandAugment (bilinear or bicubic per op)
#   crop       the data pipeline alone with the bilinear and the bicubic crop
#   decoder    pretraining with a narrower (128) or shallower (2 blocks) decoder: what the decoder's 60 % of the
#              FLOPs cost in time (model changes that need an accuracy run before they could become defaults)
set -euo pipefail
cd "$(dirname "$0")/.."
# the project, also where it is not installed (pip install -e .)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR=${OUT_DIR:-runs/gpu-throughput}
STAGES=${STAGES:-"profile autotune graphs randaug crop decoder"}
PYTHON=${PYTHON:-python3}
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
for stage in $STAGES; do  # a typo in STAGES ends the run before any stage has spent GPU time
    case $stage in
        profile|autotune|graphs|randaug|crop|decoder) ;;
        *) echo "unknown stage '$stage' (profile, autotune, graphs, randaug, crop, decoder)" >&2
           exit 2 ;;
    esac
done
mkdir -p "$OUT_DIR"
bench() {  # bench STAGE ARGS...: one throughput.py run, its lines shown and kept
    local stage=$1
    shift
    echo "# $stage: python benchmarks/throughput.py $* ${EXTRA_ARGS[*]}"
    "$PYTHON" benchmarks/throughput.py "$@" "${EXTRA_ARGS[@]}" | tee -a "$OUT_DIR/$stage.jsonl"
}
for stage in $STAGES; do
    case $stage in
        profile) bench profile --cases pretrain --paths fast --steps 20 --warmup 5 --profile 3 \
                     --trace_dir "$OUT_DIR/traces" ;;
        autotune) bench autotune --cases pretrain --paths fast --steps 20 --warmup 5 \
                      --compile_mode max-autotune-no-cudagraphs ;;
        graphs) for mode in default reduce-overhead; do
                    bench graphs --cases finetune --paths fast --finetune_batch 128 --finetune_micro 128 --steps 100 \
                        --warmup 10 --compile_mode "$mode"
                done ;;
        randaug) bench randaug --cases data,finetune --paths fast --finetune_batch 512 --finetune_micro 512 \
                     --steps 50 --warmup 5
                 bench randaug --cases data,finetune --paths fast --finetune_batch 512 --finetune_micro 512 \
                     --steps 50 --warmup 5 --randaug rand-m9-mstd0.5-inc1 ;;
        crop) for filter in bilinear bicubic; do
                  bench crop --cases data --paths fast --steps 50 --warmup 5 --interpolation "$filter"
              done ;;
        decoder) for model in decoder_emb_dim=192 "decoder_emb_dim=128 decoder_head=4" decoder_layer=2; do
                     read -r -a sizes <<< "$model"  # 128 wide needs a head count that divides it: 4, not 3
                     bench decoder --cases pretrain --paths fast --steps 20 --warmup 5 --model "${sizes[@]}"
                 done ;;
    esac
done
