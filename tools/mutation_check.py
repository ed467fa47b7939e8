"""Mutation check: put plausible bugs into a copy of the code, one at a time, and run the fast tests on each.
Every mutant must be killed (some test fails); one that survives is a bug the suite would let through.

    python tools/mutation_check.py                  # every mutant: a few minutes on 2 cores
    python tools/mutation_check.py --only sign mask # the mutants whose name holds one of these words
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_TESTS = ["tests/test_references.py", "tests/test_model.py", "tests/test_training.py"]

# name: (file, text as it is, text with the bug); the text must stand exactly once in the file
MUTANTS = {
    "gradient sign flipped": ("cifar_mae/engine.py", "scaled = loss * (x.shape[0] / total)",
                              "scaled = -loss * (x.shape[0] / total)"),
    "accumulation sums instead of averaging": ("cifar_mae/engine.py", "scaled = loss * (x.shape[0] / total)",
                                               "scaled = loss"),
    "mask one patch off what the encoder dropped": ("model.py", "ids_keep = ids_shuffle[:, :num_visible]",
                                                    "ids_keep = ids_shuffle[:, 1:num_visible + 1]"),
    "decoder tokens left in shuffled order": (
        "model.py", "patches = shuffled.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2]))",
        "patches = shuffled"),
    "loss over the visible patches": ("model.py", "return (per_patch * mask).sum() / mask.sum()",
                                      "return (per_patch * (1 - mask)).sum() / (1 - mask).sum()"),
    "decoder without position embedding": ("model.py", "x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed",
                                           "x = torch.cat([x[:, :1], patches], dim=1)"),
    "residual stream promoted to fp32 again": ("model.py", "return tokens + pos_embed[:, 1:].to(tokens.dtype)",
                                               "return tokens + pos_embed[:, 1:]"),
    "a timm encoder's norm before the blocks skipped": ("model.py", "return tokens if norm_pre is None else "
                                                                   "norm_pre(tokens)", "return tokens"),
    "norm_pix_loss ignored": ("model.py", "        if self.norm_pix_loss:\n            mean",
                              "        if False:\n            mean"),
    "CIFAR channels in BGR order": ("cifar_mae/datasets.py", "torch.from_numpy(ds.data).permute(0, 3, 1, 2)",
                                    "torch.from_numpy(ds.data).permute(0, 3, 1, 2).flip(1)"),
    "image files transposed": ("cifar_mae/image_folders.py", "np.asarray(img).copy()).permute(2, 0, 1)",
                               "np.asarray(img).copy()).permute(2, 1, 0)"),
    "learning rate scaled by batch / 128": ("cifar_mae/optim.py", "args.batch_size / 256", "args.batch_size / 128"),
    "warmup counted in epochs, not steps": ("cifar_mae/optim.py",
                                            "warmup_steps=args.warmup_epoch * steps_per_epoch",
                                            "warmup_steps=args.warmup_epoch"),
    "warmup starts at step 1": ("cifar_mae/optim.py", "peak_lr * (step + 1) / warmup_steps",
                                "peak_lr * step / warmup_steps"),
    "layer-wise lr decay never reaches the optimizer": ("cifar_mae/optim.py",
                                                        'group["lr"] = lr * group.get("lr_scale", 1.0)',
                                                        'group["lr"] = lr'),
    "export scales the position embedding": (
        "cifar_mae/timm_export.py", "state = {k: v.detach().clone() for k, v in model.state_dict().items()}",
        'state = {k: (v * 0.8 if k == "pos_embed" else v).detach().clone() for k, v in model.state_dict().items()}'),
    "--clip_grad dropped": ("train_classifier.py", "clip_grad=args.clip_grad, ema=ema", "clip_grad=None, ema=ema"),
    "--mixup and --cutmix swapped": ("cifar_mae/classification.py",
                                     "Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,",
                                     "Mixup(mixup_alpha=args.cutmix, cutmix_alpha=args.mixup,"),
    "--ema_decay dropped": ("train_classifier.py", "ModelEmaV3(model, decay=args.ema_decay)", "ModelEmaV3(model)"),
    "--drop_path dropped": ("train_classifier.py", "model = new_classifier(config, args.drop_path)",
                            "model = new_classifier(config)"),
    "normalised to [0, 1] instead of [-1, 1]": ("cifar_mae/augment.py", "images.float().div(127.5).sub(1.0)",
                                                "images.float().div(255.0)"),
}


def get_args_parser():
    parser = argparse.ArgumentParser("mutation check", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--only", nargs="+", default=None, metavar="WORD",
                        help="run only the mutants whose name holds one of these words (default: all)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds one mutant's test run may take")
    return parser


def tracked_files():
    listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    return [path for path in listing.splitlines() if path.endswith(".py")]


def run_mutant(name, path, before, after, timeout):
    """-> (killed, seconds, the first test that failed or why the run ended)."""
    with tempfile.TemporaryDirectory(prefix="mutant-") as copy:
        for tracked in tracked_files():
            os.makedirs(os.path.join(copy, os.path.dirname(tracked)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, tracked), os.path.join(copy, tracked))
        with open(os.path.join(copy, path)) as f:
            text = f.read()
        if before and text.count(before) != 1:
            sys.exit(f"error: mutant {name!r}: {path} holds its text {text.count(before)} times, not once; "
                     "update MUTANTS")
        with open(os.path.join(copy, path), "w") as f:
            f.write(text.replace(before, after))
        start = time.perf_counter()
        try:
            result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                     *FAST_TESTS], cwd=copy, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return True, time.perf_counter() - start, "timed out"
        if result.returncode not in (0, 1, 2):  # 1: tests failed, 2: a test module failed to import
            sys.exit(f"error: mutant {name!r}: pytest could not run (exit code {result.returncode}):\n"
                     f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
        failed = next((line.split()[1] for line in result.stdout.splitlines()
                       if line.startswith(("FAILED ", "ERROR "))), "-")
        return result.returncode != 0, time.perf_counter() - start, failed


def main(args):
    chosen = {name: spec for name, spec in MUTANTS.items()
              if not args.only or any(word in name for word in args.only)}
    killed, seconds, by = run_mutant("none", "model.py", "", "", args.timeout)  # the code as it is must pass
    if killed:
        sys.exit(f"error: the fast tests fail on the code as it is ({by}); fix that first")
    print(f"baseline {seconds:6.1f}s  the code as it is passes the fast tests", flush=True)
    survived = []
    for name, (path, before, after) in chosen.items():
        killed, seconds, by = run_mutant(name, path, before, after, args.timeout)
        print(f"{'killed  ' if killed else 'SURVIVED'} {seconds:6.1f}s  {name}  ({by})", flush=True)
        if not killed:
            survived.append(name)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutants killed")
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
