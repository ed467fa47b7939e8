"""Time to accuracy: MAE-pretrain for E1 epochs, fine-tune for E2 epochs, report each phase's wall time and the
test accuracy as one JSON line.

    python benchmarks/time_to_accuracy.py --data_dir data --pretrain_epochs 100 --finetune_epochs 30
    python benchmarks/time_to_accuracy.py --data_dir data --pretrain_epochs 0 --finetune_epochs 30   # scratch

Each phase runs the real script (its main(args)) in this process, with its default flags unless
--pretrain_args / --finetune_args add more (a quoted string of flags). Warmup epochs default to a tenth
(pretraining) and a twentieth (fine-tuning) of the epochs, the ratios of the full recipes. The JSON line is
also written to OUT_DIR/report.json, and

    python benchmarks/time_to_accuracy.py --summarize runs/recipe/mae runs/recipe/scratch

prints the reports of several runs as one table (what benchmarks/gpu_recipe.sh ends with).
"""
import json
import os
import shlex
import time

import mae_pretrain
import train_classifier
from cifar_mae.atomic import write_atomic
from cifar_mae.cli import cli_main
from cifar_mae.errors import UserError
from cifar_mae.flags import ArgumentParser, check_positive, path_arg
from cifar_mae.metrics import read_json_lines


def get_args_parser():
    parser = ArgumentParser("time to accuracy")
    parser.add_argument("--data_dir", type=path_arg, default="data", help="as the scripts' --data_dir")
    parser.add_argument("--out_dir", type=path_arg, default="runs/time-to-accuracy",
                        help="checkpoints and logs of this run")
    parser.add_argument("--pretrain_epochs", type=int, default=100, help="0: fine-tune from scratch")
    parser.add_argument("--pretrained_model_path", type=path_arg, default=None,
                        help="skip pretraining and fine-tune (or probe) this MAE checkpoint")
    parser.add_argument("--finetune_epochs", type=int, default=30, help="fine-tuning (or probing) epochs")
    parser.add_argument("--pretrain_args", default="", help="more mae_pretrain.py flags, quoted")
    parser.add_argument("--finetune_args", default="", help="more train_classifier.py flags, quoted")
    parser.add_argument("--check", action="store_true",
                        help="parse and check both phases' flags, run nothing (what a script of several runs does "
                             "first)")
    parser.add_argument("--summarize", type=path_arg, nargs="+", metavar="OUT_DIR", default=None,
                        help="run nothing: print the report.json of these earlier runs as a table")
    return parser


def summary_table(out_dirs):
    """One row per run: what it trained, its wall time, and the test accuracy of its chosen and last epoch."""
    rows = [("run", "pretraining", "fine-tuning", "minutes", "top-1", "last epoch")]
    for out_dir in out_dirs:
        path = os.path.join(out_dir, "report.json")
        try:
            with open(path) as f:
                report = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"--summarize: cannot read {path} ({e.__class__.__name__}); is {out_dir} the "
                            "--out_dir of a finished run?") from None
        done, asked = report.get("pretrain_epochs_done", report["pretrain_epochs"]), report["pretrain_epochs"]
        pretraining = report["pretrained_model_path"] or (
            (f"{done} epochs" if done == asked else f"{done} of {asked} epochs") if asked else "none (scratch)")
        kind = "linear probe" if "--linear_probe" in report["finetune_args"].split() else "fine-tune"
        rows.append((os.path.basename(os.path.normpath(out_dir)), pretraining,
                     f"{report['finetune_epochs']} epochs, {kind}", f"{report['total_seconds'] / 60:.1f}",
                     f"{report['best_test_acc']:.2%}", f"{report['final_epoch_acc']:.2%}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines + ["top-1: the test accuracy of the epoch each run kept (picked on the test set, or on "
                              "held-out training images with --val_size); last epoch: of the final weights"])


def phase_args(module, argv, extra, flag):
    """A phase's parsed and checked flags: a bad flag in --pretrain_args or --finetune_args ends the run before
    any phase has started (not after an hour of pretraining)."""
    try:
        extra = shlex.split(extra)
    except ValueError as e:
        raise UserError(f"{flag}: {e} (give the flags as one quoted string)") from None
    args = module.get_args_parser().parse_args(argv + extra)
    module.check_args(args)
    return args


def run_phase(module, args):
    start = time.perf_counter()
    result = module.main(args)
    return result, time.perf_counter() - start


def read_metrics(log_dir):
    return read_json_lines(os.path.join(log_dir, "metrics.jsonl"))


@cli_main
def main(args):
    if args.summarize:
        table = summary_table(args.summarize)
        print(table)
        return table
    if args.pretrain_epochs < 0:
        raise UserError(f"--pretrain_epochs must not be negative (0: no pretraining), got {args.pretrain_epochs}")
    check_positive(args, "finetune_epochs")
    report = {"pretrain_epochs": None if args.pretrained_model_path else args.pretrain_epochs,
              "pretrained_model_path": args.pretrained_model_path, "finetune_epochs": args.finetune_epochs,
              "pretrain_args": args.pretrain_args, "finetune_args": args.finetune_args}
    finetune_argv = ["--data_dir", args.data_dir, "--total_epoch", str(args.finetune_epochs),
                     "--warmup_epoch", str(max(1, args.finetune_epochs // 20)), "--overwrite",
                     "--output_model_path", os.path.join(args.out_dir, "classifier.pth"),
                     "--log_dir", os.path.join(args.out_dir, "logs", "classifier")]
    mae_path, log_dir = os.path.join(args.out_dir, "mae.pth"), os.path.join(args.out_dir, "logs", "mae")
    pretraining = not args.pretrained_model_path and args.pretrain_epochs
    if args.pretrained_model_path or pretraining:
        finetune_argv += ["--pretrained_model_path", args.pretrained_model_path or mae_path]
    finetune_args = phase_args(train_classifier, finetune_argv, args.finetune_args, "--finetune_args")
    if pretraining:
        pretrain_argv = ["--data_dir", args.data_dir, "--total_epoch", str(args.pretrain_epochs),
                         "--warmup_epoch", str(max(1, args.pretrain_epochs // 10)), "--model_path", mae_path,
                         "--log_dir", log_dir, "--overwrite"]
        pretrain_args = phase_args(mae_pretrain, pretrain_argv, args.pretrain_args, "--pretrain_args")
    if args.check:
        return None
    os.makedirs(args.out_dir, exist_ok=True)
    if pretraining:
        _, report["pretrain_seconds"] = run_phase(mae_pretrain, pretrain_args)
        metrics = read_metrics(log_dir)
        report["pretrain_epochs_done"] = metrics[-1]["epoch"]  # fewer when a --stop_after_* flag stopped it
        report["pretrain_final_loss"] = metrics[-1]["loss"]
        report["pretrain_compile_seconds"] = metrics[0].get("compile_seconds")
        report["pretrain_images_per_s"] = metrics[-1]["images_per_s"]
        knn = [m["knn_acc"] for m in metrics if "knn_acc" in m]
        if knn:
            report["pretrain_knn_acc"] = knn[-1]
    result, report["finetune_seconds"] = run_phase(train_classifier, finetune_args)
    if "final" not in result:
        raise UserError(f"the fine-tuning stopped before its last epoch (a --stop_after_* flag in "
                        f"--finetune_args?), so it has no final accuracy to report; {args.out_dir} holds "
                        "what it trained")
    metrics = read_metrics(os.path.join(args.out_dir, "logs", "classifier"))
    epochs = [m for m in metrics if "val_acc" in m]
    report["finetune_images_per_s"] = epochs[-1]["images_per_s"]
    report["finetune_compile_seconds"] = epochs[0].get("compile_seconds")
    report["final_epoch_acc"] = result["last_epoch_acc"]  # on the test set, also with --val_size
    report["best_acc"] = result["best_acc"]  # on what the best epoch was picked on: test set or held-out images
    report["best_epoch"] = result["best_epoch"]
    report["best_test_acc"] = result["final"]["acc"]
    report["best_acc5"] = result["final"]["acc5"]
    report["total_seconds"] = report.get("pretrain_seconds", 0) + report["finetune_seconds"]
    line = json.dumps(report) + "\n"
    write_atomic(os.path.join(args.out_dir, "report.json"), lambda f: f.write(line.encode()))
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
