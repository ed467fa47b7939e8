"""The prepared GPU check: what a fresh GPU hour should measure first, side by side in one run (see gpu_check.sh).

    python benchmarks/gpu_check.py                 # on the GPU box; JSON lines to runs/gpu-check/check.jsonl
    python benchmarks/gpu_check.py --dry_run       # any machine: every variant's flags parsed and model built

Pretraining of ViT-T/2 with the residual stream as it was (fp32, --fp32_stream), with the bf16 stream (the
default now) and with a small decoder (2 blocks of width 128), and fine-tuning with both streams, at micro-batch
1024 and, where memory allows, 4096. Each line: images/s (median of 3 timed loops and their spread), inductor's
MB per image, TB/s and share of the HBM peak, peak memory. Every variant is checked before the first compile; a
variant that would start past --time_limit seconds is skipped with a note, so the run ends in time.
"""
import argparse
import json
import os
import time

import torch

from benchmarks import throughput
from cifar_mae.cli import cli_main
from cifar_mae.errors import UserError
from cifar_mae.flags import ArgumentParser, path_arg

SMALL_DECODER = ["--model", "decoder_layer=2", "decoder_emb_dim=128", "decoder_head=4"]
VARIANTS = {  # name: throughput.py flags, most wanted first
    "pretrain-fp32-stream-1024": ["--cases", "pretrain", "--pretrain_micro", "1024", "--fp32_stream"],
    "pretrain-bf16-stream-1024": ["--cases", "pretrain", "--pretrain_micro", "1024"],
    "pretrain-small-decoder-1024": ["--cases", "pretrain", "--pretrain_micro", "1024", *SMALL_DECODER],
    "finetune-fp32-stream-1024": ["--cases", "finetune", "--fp32_stream"],
    "finetune-bf16-stream-1024": ["--cases", "finetune"],
    "pretrain-bf16-stream-4096": ["--cases", "pretrain", "--pretrain_micro", "4096"],
    "finetune-bf16-stream-4096": ["--cases", "finetune", "--finetune_batch", "4096", "--finetune_micro", "4096"],
}
COMMON = ["--paths", "fast", "--steps", "10", "--warmup", "3", "--repeats", "3", "--bytes"]


def get_args_parser():
    parser = ArgumentParser("the prepared GPU check")
    parser.add_argument("--dry_run", action="store_true", help="parse every variant and build its model, then stop")
    parser.add_argument("--out", type=path_arg, default="runs/gpu-check/check.jsonl", help="JSON lines, appended")
    parser.add_argument("--time_limit", type=float, default=420.0,
                        help="seconds after which no further variant is started")
    return parser


def check_variants():
    """Every variant's flags parsed and its models built on the CPU -> {name: parsed throughput args}."""
    parsed = {}
    for name, flags in VARIANTS.items():
        args = throughput.get_args_parser().parse_args(COMMON + flags)
        cfg = {**throughput.PRESETS[args.preset], **throughput.model_overrides(args.model)}
        for key in ("pretrain_micro", "finetune_batch", "finetune_micro"):
            cfg[key] = getattr(args, key) or cfg[key]
        if cfg["pretrain_batch"] % cfg["pretrain_micro"] or cfg["finetune_batch"] % cfg["finetune_micro"]:
            raise UserError(f"variant {name}: a batch that its micro-batch does not divide")
        for case in args.cases.split(","):
            throughput.build(case, cfg, argparse.Namespace(device=torch.device("cpu")))
        parsed[name] = args
    return parsed


@cli_main
def main(args):
    variants = check_variants()
    print(f"checked {len(variants)} variants: {', '.join(variants)}", flush=True)
    if args.dry_run:
        return variants
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    start = time.perf_counter()
    for name, flags in variants.items():
        if time.perf_counter() - start > args.time_limit:
            print(json.dumps({"variant": name, "skipped": f"past --time_limit {args.time_limit:g} s"}), flush=True)
            continue
        try:
            lines = throughput.main(flags)
        except SystemExit as e:  # out of memory at 4096, say: the other variants still run
            lines = [{"failed": f"exit code {e.code}"}]
        with open(args.out, "a") as f:
            f.writelines(json.dumps({"variant": name, **line}) + "\n" for line in lines)
    print(f"done in {time.perf_counter() - start:.0f} s; lines appended to {args.out}", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
