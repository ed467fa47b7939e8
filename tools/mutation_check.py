"""Mutation check: put plausible bugs into a copy of the code, one at a time, and run the tests on each.
A mutant is killed when a test fails on an assertion, or on an error raised in the mutated file; a timeout, a
collection error or an error elsewhere kills nothing. One that survives is a bug the suite would let through.

    python tools/mutation_check.py                             # every mutant, the whole suite (about 1 h on 2 cores)
    python tools/mutation_check.py --only sign mask            # the mutants whose name holds one of these words
    python tools/mutation_check.py --tests tests/test_references.py tests/test_model.py

Each mutant's run stops at the first test that kills it (as -x would) and names that test.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the files where most mutants die, first: a run stops at its first kill
FIRST_TESTS = ["tests/test_moco.py", "tests/test_references.py", "tests/test_schedule_evaluation_monitors.py", "tests/test_model.py",
               "tests/test_training.py", "tests/test_randaug.py"]
# fails on every mutant by design (each mutant's text must stand in the unmutated code)
NOT_RUN = "tests/test_benchmarks.py::test_every_mutant_of_the_mutation_check_still_finds_its_text"
REPORT = "MUTATION_CHECK_REPORT"  # the file this module, as a pytest plugin, writes each failure to
MUTATED = "MUTATION_CHECK_FILE"   # the mutated file, as a path in the copy

# name: (file, text as it is, text with the bug); the text must stand exactly once in the file
MUTANTS = {
    "gradient sign flipped": ("cifar_mae/engine.py", "scaled = loss * (x.shape[0] / total)",
                              "scaled = -loss * (x.shape[0] / total)"),
    "accumulation sums instead of averaging": ("cifar_mae/engine.py", "scaled = loss * (x.shape[0] / total)",
                                               "scaled = loss"),
    "schedule restarts every epoch": ("cifar_mae/engine.py", "first_step=epoch * len(loader),", "first_step=0,"),
    "cosine never reaches its end": ("cifar_mae/optim.py", "total_steps=total_epoch * steps_per_epoch)",
                                     "total_steps=(total_epoch + warmup_epoch) * steps_per_epoch)"),
    "mask one patch off what the encoder dropped": ("model.py", "ids_keep = ids_shuffle[:, :num_visible]",
                                                    "ids_keep = ids_shuffle[:, 1:num_visible + 1]"),
    "decoder tokens left in shuffled order": (
        "model.py", "patches = shuffled.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2]))",
        "patches = shuffled"),
    "loss over the visible patches": ("model.py", "return (per_patch * mask).sum() / mask.sum()",
                                      "return (per_patch * (1 - mask)).sum() / (1 - mask).sum()"),
    "decoder without position embedding": ("model.py", "x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed",
                                           "x = torch.cat([x[:, :1], patches], dim=1)"),
    "sin-cos never reaches the decoder": ("model.py", "encoder_emb_dim=emb_dim, pos_embed=pos_embed)",
                                          'encoder_emb_dim=emb_dim, pos_embed="learned")'),
    "residual stream promoted to fp32 again": ("model.py", "return tokens + pos_embed[:, 1:].to(tokens.dtype)",
                                               "return tokens + pos_embed[:, 1:]"),
    "a timm encoder's norm before the blocks skipped": ("model.py", "return tokens if norm_pre is None else "
                                                                   "norm_pre(tokens)", "return tokens"),
    "norm_pix_loss ignored": ("model.py", "        if self.norm_pix_loss:\n            mean",
                              "        if False:\n            mean"),
    "head initialisations swapped": ("cifar_mae/heads.py", "std=0.01 if linear_probe else 2e-5",
                                     "std=2e-5 if linear_probe else 0.01"),
    "CIFAR channels in BGR order": ("cifar_mae/datasets.py", "torch.from_numpy(ds.data).permute(0, 3, 1, 2)",
                                    "torch.from_numpy(ds.data).permute(0, 3, 1, 2).flip(1)"),
    "resized without antialiasing": ("cifar_mae/datasets.py", 'mode="bilinear", antialias=True,',
                                     'mode="bilinear", antialias=False,'),
    "image files transposed": ("cifar_mae/image_folders.py", "np.asarray(img).copy()).permute(2, 0, 1)",
                               "np.asarray(img).copy()).permute(2, 1, 0)"),
    "learning rate scaled by batch / 128": ("cifar_mae/optim.py", "base_learning_rate * batch_size / 256",
                                            "base_learning_rate * batch_size / 128"),
    "warmup counted in epochs, not steps": ("cifar_mae/optim.py",
                                            "warmup_steps=warmup_epoch * steps_per_epoch",
                                            "warmup_steps=warmup_epoch"),
    "warmup starts at step 1": ("cifar_mae/optim.py", "peak_lr * (step + 1) / warmup_steps",
                                "peak_lr * step / warmup_steps"),
    "layer-wise lr decay never reaches the optimizer": ("cifar_mae/optim.py",
                                                        'group["lr"] = lr * group.get("lr_scale", 1.0)',
                                                        'group["lr"] = lr'),
    "export scales the position embedding": (
        "cifar_mae/timm_export.py", "{k: v.detach().clone() for k, v in model.state_dict().items()}, Classifier",
        '{k: (v * 0.8 if k == "pos_embed" else v).detach().clone() for k, v in model.state_dict().items()}, '
        'Classifier'),
    "--clip_grad dropped": ("train_classifier.py", "clip_grad=self.args.clip_grad, ema=ema", "clip_grad=None, ema=ema"),
    "--mixup and --cutmix swapped": ("cifar_mae/classification.py",
                                     "Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix,",
                                     "Mixup(mixup_alpha=cutmix, cutmix_alpha=mixup,"),
    "--ema_decay dropped": ("train_classifier.py", "ModelEmaV3(model, decay=self.args.ema_decay)", "ModelEmaV3(model)"),
    "--layer_decay never reaches the optimizer": ("cifar_mae/lifecycle.py", 'getattr(args, "layer_decay", None))',
                                                  "None)"),
    "--drop_path dropped": ("train_classifier.py", "model = build_classifier(self.config, args.drop_path)",
                            "model = build_classifier(self.config)"),
    "EMA weights never evaluated or saved": ("train_classifier.py", "trainer.ema.module if args.ema else model",
                                             "model"),
    "evaluation in training mode": ("cifar_mae/runtime.py", "    was_training = model.training\n    model.eval()\n",
                                    "    was_training = model.training\n"),
    "kNN features not normalised": ("cifar_mae/knn.py", "F.normalize(train_feats.float(), dim=1)",
                                    "train_feats.float()"),
    "--knn_k and --knn_t ignored": ("cifar_mae/pretraining.py", "rt, k=self.args.knn_k, temperature=self.args.knn_t)", "rt)"),
    "kNN monitor reads the last token": ("model.py", "        return features[:, 0]",
                                         "        return features[:, -1]"),
    "RandAugment skips with probability p": ("cifar_mae/randaug.py", "u[..., 0] < self.prob",
                                             "u[..., 0] >= self.prob"),
    "each rank shuffles its own order": ("cifar_mae/loaders.py", "self.order_generator.manual_seed(seed)",
                                         "self.order_generator.manual_seed(seed + rank)"),
    "every rank draws the same augmentation": ("cifar_mae/loaders.py",
                                               "self.aug_generator.manual_seed(seed + 1 + rank)",
                                               "self.aug_generator.manual_seed(seed + 1)"),
    "random erasing takes boxes as large as the image": ("cifar_mae/augment.py",
                                                         "fits = (box_h < height) & (box_w < width)",
                                                         "fits = (box_h <= height) & (box_w <= width)"),
    "normalised to [0, 1] instead of [-1, 1]": ("cifar_mae/augment.py", "images.float().div(127.5).sub(1.0)",
                                                "images.float().div(255.0)"),
    "resume leaves the EMA at the live weights": ("cifar_mae/checkpoint.py",
                                                  'trainer.ema.module.load_state_dict(ckpt["ema"])',
                                                  'trainer.ema.module.load_state_dict(ckpt["model"])'),
    # MoCo
    "MoCo temperature dropped": ("cifar_mae/moco.py",
                                 "logits = torch.cat([positive, negative], dim=1) / self.temperature",
                                 "logits = torch.cat([positive, negative], dim=1)"),
    "momentum update reversed": ("cifar_mae/moco.py", "query, 1 - momentum)", "query, momentum)"),
    "queue pointer not advanced": ("cifar_mae/moco.py",
                                   "self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % self.queue.shape[0])",
                                   "self.queue_ptr.copy_(self.queue_ptr)"),
    "key encoder trainable": ("cifar_mae/moco.py", "param.requires_grad_(False)", "param.requires_grad_(True)"),
    "positive logit at the wrong index": ("cifar_mae/moco.py", "torch.cat([positive, negative], dim=1)",
                                          "torch.cat([negative, positive], dim=1)"),
    "both views the same": ("cifar_mae/views.py",
                            "torch.stack([self.view(images), self.view(images)], dim=1)",
                            "self.view(images)[:, None].expand(-1, 2, -1, -1, -1)"),
}


# ---- as a pytest plugin (-p tools.mutation_check): each failure, and whether it kills, to the REPORT file

def _kind(excinfo):
    """'assertion', 'error in the mutated code' (kills) or 'error elsewhere' (does not)."""
    if excinfo.errisinstance((AssertionError, pytest.fail.Exception)):
        return "assertion"
    mutated = os.path.realpath(os.environ[MUTATED])
    if any(os.path.realpath(str(entry.path)) == mutated for entry in excinfo.traceback):
        return "error in the mutated code"
    return "error elsewhere"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed or call.excinfo is None or REPORT not in os.environ:
        return
    kind = _kind(call.excinfo)
    message = call.excinfo.exconly().strip().splitlines()[0][:200]
    with open(os.environ[REPORT], "a") as f:
        f.write(json.dumps({"test": item.nodeid, "kind": kind, "message": message}) + "\n")
    if kind != "error elsewhere":
        item.session.shouldstop = "the mutant is killed"


# ---- the check

def get_args_parser():
    parser = argparse.ArgumentParser("mutation check", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--only", nargs="+", default=None, metavar="WORD",
                        help="run only the mutants whose name holds one of these words (default: all)")
    parser.add_argument("--tests", nargs="+", default=None, metavar="PATH",
                        help="test files to run (default: the whole suite, the files where most mutants die first)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds one mutant's test run may take")
    return parser


def default_tests():
    rest = sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
    return FIRST_TESTS + [path for path in rest if path not in FIRST_TESTS]


def copy_tree(dest):
    listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    for path in listing.splitlines():
        if os.path.isfile(os.path.join(ROOT, path)):
            os.makedirs(os.path.join(dest, os.path.dirname(path)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, path), os.path.join(dest, path))


def run_mutant(name, path, before, after, tests, timeout):
    """-> (killed, seconds, what ended the run: the killing test, or why nothing was killed)."""
    with tempfile.TemporaryDirectory(prefix="mutant-") as copy:
        copy_tree(copy)
        with open(os.path.join(copy, path)) as f:
            text = f.read()
        if before and text.count(before) != 1:
            sys.exit(f"error: mutant {name!r}: {path} holds its text {text.count(before)} times, not once; "
                     "update MUTANTS")
        with open(os.path.join(copy, path), "w") as f:
            f.write(text.replace(before, after))
        report = os.path.join(copy, "mutation-report.jsonl")
        # PYTHONPATH: the copy's code, not an installed checkout's, in every process the tests start
        env = {**os.environ, REPORT: report, MUTATED: os.path.join(copy, path), "PYTHONPATH": copy}
        start = time.perf_counter()
        try:
            result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                     "-p", "tools.mutation_check", "--deselect", NOT_RUN, *tests],
                                    cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, time.perf_counter() - start, f"timed out after {timeout} s: not a kill"
        seconds = time.perf_counter() - start
        failures = []
        if os.path.exists(report):
            with open(report) as f:
                failures = [json.loads(line) for line in f]
        kills = [failure for failure in failures if failure["kind"] != "error elsewhere"]
        if kills:
            return True, seconds, f"{kills[0]['test']}: {kills[0]['kind']}: {kills[0]['message']}"
        if result.returncode == 2 or (result.returncode not in (0, 1) and not failures):
            tail = result.stdout.strip().splitlines()[-1:] or ["?"]
            return False, seconds, f"pytest could not run the tests (exit {result.returncode}: {tail[0]})"
        if failures:
            return False, seconds, f"only errors outside {path}, first {failures[0]['test']}: {failures[0]['message']}"
        return False, seconds, "every test passed"


def main(args):
    tests = args.tests or default_tests()
    chosen = {name: spec for name, spec in MUTANTS.items()
              if not args.only or any(word in name for word in args.only)}
    start = time.perf_counter()
    killed, seconds, why = run_mutant("none", "model.py", "", "", tests, args.timeout)
    if killed or why != "every test passed":  # the code as it is must pass
        sys.exit(f"error: the tests do not pass on the code as it is ({why}); fix that first")
    print(f"baseline {seconds:6.1f}s  the code as it is passes {len(tests)} test files", flush=True)
    survived = []
    for name, (path, before, after) in chosen.items():
        killed, seconds, why = run_mutant(name, path, before, after, tests, args.timeout)
        print(f"{'killed  ' if killed else 'SURVIVED'} {seconds:6.1f}s  {name}  ({why})", flush=True)
        if not killed:
            survived.append(name)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutants killed in "
          f"{(time.perf_counter() - start) / 60:.0f} min")
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
