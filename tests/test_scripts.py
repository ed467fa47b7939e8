"""Both scripts end to end, as a user runs them: files, logs, exit codes, resume, signals, bad inputs."""
import argparse
import contextlib
import io
import json
import math
import os
import shutil
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from types import SimpleNamespace

import pytest

import torch

from conftest import ROOT, TINY_MAE, TINY_MODEL, brute_force_knn, cls_features, interrupt_at_step, write_cifar100, \
    write_cifar_batches, write_image_folder
from cifar_mae.atomic import save_atomic
from cifar_mae.augment import normalize
from cifar_mae.classification import evaluate
from cifar_mae.console import progress_bar
from cifar_mae.datasets import holdout_split, load_data
from cifar_mae.engine import checkpoint_due
from cifar_mae import lifecycle
from cifar_mae.settings import take_saved
from cifar_mae.loaders import make_loader
from cifar_mae.timm_export import classifier_export, encoder_export
from cifar_mae.runtime import setup_runtime

SHARED_CIFAR = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg.tar.gz")
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}


def run(script, *args, env=None, timeout=None):
    """A script's main(args) in this process (torch is imported once), in the repository's folder with `env`
    set, offline -> returncode, stdout and stderr, as a subprocess would give them."""
    module = script_module(script)
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    os.environ.update({**OFFLINE, **(env or {})})
    sys.argv = [os.path.join(ROOT, script), *map(str, args)]
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                module.main(module.get_args_parser().parse_args(list(map(str, args))))
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def run_process(script, *args, env=None, timeout=240):
    """A script in a process of its own, where the exit code of the process, a signal or a launcher is the point."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **OFFLINE, **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=ROOT)


def script_module(script):
    """The module of a script given by its path in the repository (tools/ and benchmarks/ are folders, not
    packages), imported once."""
    import importlib.util
    name = script[:-len(".py")].replace("/", ".")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def run_here(capsys, script, *args):
    """A script's main(args) in this process, as run() starts it in another (seconds faster: torch is already
    imported) -> the same kind of result: returncode, stdout, stderr."""
    module = script_module(script)
    capsys.readouterr()
    try:
        module.main(module.get_args_parser().parse_args(list(map(str, args))))
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess([script, *args], code, captured.out, captured.err)


def pretrain(tmp_path, data, *extra, name="mae", capsys=None):
    """A tiny pretraining run: in a new process, or in this one when given capsys."""
    ckpt, logs = tmp_path / f"{name}.pth", tmp_path / "logs" / name
    argv = ["--data_dir", data, *TINY_MAE, "-bs", 16, "--max_device_batch_size", 8, "--total_epoch", 2,
            "--warmup_epoch", 1, "--model_path", ckpt, "--log_dir", logs, *extra]
    result = run_here(capsys, "mae_pretrain.py", *argv) if capsys else run("mae_pretrain.py", *argv)
    return result, ckpt, logs


def classify(tmp_path, data, *extra, name="cls", capsys=None):
    """A tiny classifier run: in a new process, or in this one when given capsys."""
    ckpt, logs = tmp_path / f"{name}.pth", tmp_path / "logs" / name
    argv = ["--data_dir", data, "--batch_size", 16, "--max_device_batch_size", 8, "--total_epoch", 2,
            "--warmup_epoch", 1, "--output_model_path", ckpt, "--log_dir", logs, *extra]
    result = run_here(capsys, "train_classifier.py", *argv) if capsys else run("train_classifier.py", *argv)
    return result, ckpt, logs


def events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def strict_json(text):
    """json.loads without Python's NaN / Infinity extensions, which other JSON readers (jq, browsers) refuse."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def metrics(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [strict_json(line) for line in f]


def assert_clean_error(result, code, *fragments):
    """One line on stderr (after any progress output), the exit code, no traceback."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in last, last


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same_tensors(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{path}[{i}]")


# ------------------------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("layout", ["cifar", "folder"])
def test_pretraining_end_to_end(tmp_path, layout):
    data = write_cifar_batches(str(tmp_path / "data")) if layout == "cifar" else \
        write_image_folder(str(tmp_path / "data"))
    result, ckpt_path, logs = pretrain(tmp_path, data, "--knn_every", 1)
    assert result.returncode == 0, result.stderr
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and epoch_lines[0].endswith(" left") and "left" not in epoch_lines[1]
    ckpt = load(ckpt_path)
    assert ckpt["kind"] == "mae_pretrain" and ckpt["epoch"] == 2 and ckpt["model_config"]["emb_dim"] == 16
    lines = metrics(logs)
    assert [line["epoch"] for line in lines] == [1, 2]
    assert all({"loss", "lr", "images_per_s", "seconds", "knn_acc"} <= set(line) for line in lines)
    tb = events(logs)
    assert {"mae_loss", "lr", "images_per_s", "knn_acc"} <= set(tb.Tags()["scalars"])
    assert [e.step for e in tb.Scalars("mae_loss")] == [1, 2]
    assert tb.Scalars("mae_loss")[-1].value == pytest.approx(lines[-1]["loss"], rel=1e-6)
    assert [e.step for e in tb.Images("mae_image")] == [1, 2]  # a short run: every epoch
    image = tb.Images("mae_image")[-1]
    assert (image.height, image.width) == (8 * 8, 2 * 3 * 8)  # 8 rows of 2 x (masked | reconstruction | original)


def test_reconstruction_images_every_n_epochs_and_the_last(tmp_path, cifar_dir):
    import mae_pretrain
    due = lambda total, every=None: [e for e in range(1, total + 1) if mae_pretrain.image_due(
        argparse.Namespace(total_epoch=total, image_every=every), e)]
    assert due(3) == [1, 2, 3] and due(100) == list(range(1, 101))
    assert due(2000) == list(range(20, 2001, 20)) and due(250) == list(range(2, 251, 2))  # about 100 a run
    assert due(7, 3) == [3, 6, 7] and due(3, 10) == [3]
    result, _, logs = pretrain(tmp_path, cifar_dir, "--total_epoch", 5, "--image_every", 2)
    assert result.returncode == 0, result.stderr
    assert [e.step for e in events(logs).Images("mae_image")] == [2, 4, 5]
    assert [line["epoch"] for line in metrics(logs)] == [1, 2, 3, 4, 5]


def test_pretraining_compiled_on_cpu(tmp_path, cifar_dir, monkeypatch):
    """The CUDA default path compiles the model; CI has no GPU, so compile it here (inductor's CPU backend): the
    compiled run trains the same model as the eager one, up to float rounding, and times its compilation."""
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # eager's masks, drawn by aten
    result, ckpt, logs = pretrain(tmp_path, cifar_dir, "--compile", "--total_epoch", 1)
    assert result.returncode == 0, result.stderr
    eager, eager_ckpt, eager_logs = pretrain(tmp_path, cifar_dir, "--total_epoch", 1, name="eager")
    assert eager.returncode == 0, eager.stderr
    line, eager_line = metrics(logs)[0], metrics(eager_logs)[0]
    assert line["loss"] == pytest.approx(eager_line["loss"], rel=1e-5)
    assert line["compile_seconds"] > 0 and "compile_seconds" not in eager_line
    compiled, plain = load(ckpt), load(eager_ckpt)
    assert compiled["epoch"] == 1 and compiled["model"].keys() == plain["model"].keys()  # no _orig_mod. prefix
    for key, value in plain["model"].items():
        torch.testing.assert_close(compiled["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_mae_eval_only_gives_the_knn_accuracy_of_training_and_the_test_loss(tmp_path, cifar_dir):
    import mae_pretrain
    result, mae_path, logs = pretrain(tmp_path, cifar_dir, "--knn_every", 2)
    assert result.returncode == 0, result.stderr
    evaluate = lambda *flags: mae_pretrain.main(mae_pretrain.get_args_parser().parse_args(
        ["--data_dir", cifar_dir, "--eval_only", str(mae_path), *flags]))
    out = evaluate()
    # the same weights, the same monitor: what training logged after its last epoch
    assert out["knn_acc"] == metrics(logs)[-1]["knn_acc"] and out["epoch"] == 2 and out["mask_ratio"] == 0.75
    # the loss of the 20 test images in one batch, masks drawn from seed 0
    ckpt = load(mae_path)
    model = mae_pretrain.build_mae(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    images = normalize(load_data(cifar_dir, 8).test_images)
    torch.manual_seed(0)
    with torch.no_grad():
        assert out["test_loss"] == pytest.approx(model.loss(images, *model(images, 0.75)).item(), rel=1e-6)
    half = evaluate("--mask_ratio", "0.5", "--knn_k", "5")
    assert half["mask_ratio"] == 0.5 and half["test_loss"] != out["test_loss"]
    result = run("mae_pretrain.py", "--data_dir", cifar_dir, "--eval_only", mae_path, "--export_timm",
                 tmp_path / "timm.pth")
    assert result.returncode == 0, result.stderr
    assert f"kNN accuracy {out['knn_acc']:.2%} (k 200" in result.stdout
    assert f"test reconstruction loss {out['test_loss']:.4f} at mask ratio 0.75" in result.stdout
    # the encoder as a timm backbone, loaded with the printed call
    import timm
    _, kwargs = encoder_export(model.encoder, model.config)
    call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k not in ("model_name", "pretrained"))
    assert f"timm.create_model('vit_tiny_patch16_224', pretrained=False, {call})" in result.stdout
    backbone = timm.create_model(**kwargs)
    backbone.load_state_dict(load(tmp_path / "timm.pth"), strict=True)
    assert torch.equal(backbone.blocks[1].mlp.fc2.weight, ckpt["model"]["encoder.blocks.1.mlp.fc2.weight"])


def test_classifier_from_scratch_and_pretrained_end_to_end(tmp_path, cifar_dir):
    result, mae_path, _ = pretrain(tmp_path, cifar_dir)
    assert result.returncode == 0, result.stderr
    result, ckpt_path, logs = classify(tmp_path, cifar_dir, "--pretrained_model_path", mae_path)
    assert result.returncode == 0, result.stderr
    assert "best accuracy" in result.stdout and "airplane" in result.stdout
    assert f"encoder from {mae_path}: MAE pretraining after epoch 2 of 2\n" in result.stdout
    lines = metrics(logs)
    epochs = [line for line in lines if "val_acc" in line]
    assert [line["epoch"] for line in epochs] == [1, 2]
    # accuracy weighted per image: 20 test images, so a multiple of 1/20
    assert all(round(line["val_acc"] * 20, 6) == round(line["val_acc"] * 20) for line in epochs)
    assert lines[-1]["final"] and set(lines[-1]["per_class"]) == {"airplane", "automobile", "bird", "cat", "deer",
                                                                  "dog", "frog", "horse", "ship", "truck"}
    tb = events(logs)
    assert {"cls/loss/train", "cls/loss/val", "cls/acc/train", "cls/acc/val"} <= set(tb.Tags()["scalars"])
    assert "cls/confusion" in tb.Tags()["images"]
    best = load(ckpt_path)
    assert best["kind"] == "classifier" and best["acc"] == max(line["val_acc"] for line in epochs)
    # the final line names the best epoch and gives the last epoch's accuracy beside it
    assert lines[-1]["best_epoch"] == best["epoch"] and lines[-1]["last_epoch_acc"] == epochs[-1]["val_acc"]
    assert f"(epoch {best['epoch']}), last epoch {epochs[-1]['val_acc']:.2%}" in result.stdout
    last = load(tmp_path / "cls-last.pth")
    assert last["epoch"] == 2 and "optimizer" in last
    # scratch: its own default log dir name, sizes from flags
    result, scratch, _ = classify(tmp_path, cifar_dir, *TINY_MODEL, "--total_epoch", 1, name="scratch")
    assert result.returncode == 0, result.stderr
    assert load(scratch)["model_config"]["emb_dim"] == 16
    # eval_only reports top-1, top-5 and the per-class table of the saved weights
    result = run("train_classifier.py", "--data_dir", cifar_dir, "--eval_only", ckpt_path)
    assert result.returncode == 0, result.stderr
    assert f"top-1 {best['acc']:.2%}" in result.stdout and "top-5" in result.stdout and "truck" in result.stdout


def test_default_log_dirs_keep_runs_apart_and_a_new_run_needs_overwrite_to_replace_logs(tmp_path, cifar_dir,
                                                                                          monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    go = lambda *argv: run_here(capsys, "train_classifier.py", "--data_dir", cifar_dir, *TINY_MODEL, "--batch_size",
                                16, "--total_epoch", 1, "--warmup_epoch", 1, *argv)
    assert go("--output_model_path", "ft.pth").returncode == 0
    # the README's recipes: two runs of one kind, two checkpoint names
    assert go("--output_model_path", "probe.pth").returncode == 0
    logs = tmp_path / "logs" / "cifar10"
    assert sorted(os.listdir(logs)) == ["ft", "probe"]
    ft_lines = (logs / "ft" / "metrics.jsonl").read_text()
    assert len(ft_lines.splitlines()) == 2  # the epoch and the final report
    # a new run into a log dir that holds another run's logs needs --overwrite, as its checkpoint does
    result = go("--output_model_path", "other.pth", "--log_dir", logs / "ft")
    assert_clean_error(result, 2, "already holds the logs of a run")
    assert not os.path.exists("other.pth") and (logs / "ft" / "metrics.jsonl").read_text() == ft_lines
    assert go("--output_model_path", "other.pth", "--log_dir", logs / "ft", "--overwrite", "--seed", 7).returncode == 0
    assert (logs / "ft" / "metrics.jsonl").read_text() != ft_lines
    assert json.loads((logs / "ft" / "runs.jsonl").read_text())["args"]["seed"] == 7


def test_a_running_run_keeps_a_second_run_off_its_checkpoint(tmp_path, cifar_dir, monkeypatch, capsys):
    """Two runs given one checkpoint (a job started twice): the second stops in one line and writes nothing; a
    lock left by a killed run stops nobody."""
    monkeypatch.chdir(tmp_path)
    go = lambda *argv: run_here(capsys, "train_classifier.py", "--data_dir", cifar_dir, *TINY_MODEL, "--batch_size",
                                16, "--total_epoch", 1, "--warmup_epoch", 1, *argv)
    # another process holds the run's lock, as a run that has not yet written a checkpoint does
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from cifar_mae.outputs import lock_output; "
                               "lock_output('cls.pth', '-'); print('held', flush=True); sys.stdin.read()"],
                              cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert holder.stdout.readline() == "held\n"
        for flags in ([], ["--overwrite"]):
            result = go("--output_model_path", "cls.pth", *flags)
            assert_clean_error(result, 2, "--output_model_path cls.pth is being written by another run")
        assert sorted(os.listdir(tmp_path)) == [".cls.pth.lock", "data"]  # nothing written
        holder.kill()  # killed with -9: the kernel drops its lock, and the file it leaves is taken over
        holder.wait()
    finally:
        holder.kill()
        holder.stdin.close()
        holder.stdout.close()
    assert go("--output_model_path", "cls.pth").returncode == 0
    assert {"cls-last.pth", "cls.pth"} <= set(os.listdir(tmp_path))


def test_val_size_picks_the_best_epoch_on_held_out_training_images(tmp_path, cifar_dir):
    import train_classifier
    result, ckpt_path, logs = classify(tmp_path, cifar_dir, *TINY_MODEL, "--val_size", 30, "--total_epoch", 3)
    assert result.returncode == 0, result.stderr
    # 100 training images, 30 held out: 70 // 16 = 4 steps per epoch, not 100 // 16 = 6
    assert "4 steps/epoch" in result.stdout and "picked on 30 held-out training images" in result.stdout
    lines = metrics(logs)
    epochs, final = lines[:-1], lines[-1]
    best = load(ckpt_path)
    assert best["acc"] == max(line["val_acc"] for line in epochs) == final["best_acc"]
    assert best["selected_on"] == final["selected_on"] == "30 held-out training images"
    # the per-epoch accuracy is of the held-out images and the final one of the test set: evaluate both here
    rt = setup_runtime(0, device="cpu")
    data = load_data(cifar_dir, 8)
    kept, held = holdout_split(len(data.train_images), 30)
    model = train_classifier.build_classifier(best["model_config"])
    model.load_state_dict(best["model"])

    def accuracy(images, labels):
        loader = make_loader(rt, images, labels, 1024, train=False)
        return evaluate(model, loader, rt, 10)["acc"]
    assert accuracy(data.train_images[held], data.train_labels[held]) == best["acc"]
    assert accuracy(data.test_images, data.test_labels) == final["acc"]
    assert f"on the test set: those weights {final['acc']:.2%}, last epoch {final['last_epoch_acc']:.2%}" \
        in result.stdout
    assert round(final["last_epoch_acc"] * 20, 6) == round(final["last_epoch_acc"] * 20)  # 20 test images
    # the same split whatever the run's seed; a hold-out that leaves too few images is refused
    assert torch.equal(holdout_split(100, 30)[1], held)
    result, _, _ = classify(tmp_path, cifar_dir, *TINY_MODEL, "--val_size", 90, name="small")
    assert_clean_error(result, 2, "--batch_size 16 is larger than the training set (10 images)")
    result, _, _ = classify(tmp_path, cifar_dir, *TINY_MODEL, "--val_size", 100, name="none")
    assert_clean_error(result, 2, "--val_size 100 leaves no images to train on")


def test_time_to_accuracy_reports_both_phases(tmp_path, cifar_dir):
    result = run("benchmarks/time_to_accuracy.py", "--data_dir", cifar_dir, "--out_dir", tmp_path / "tta",
                 "--pretrain_epochs", 1, "--finetune_epochs", 2, "--pretrain_args",
                 " ".join(TINY_MAE + ["-bs", "16", "--max_device_batch_size", "8"]),
                 "--finetune_args", "--batch_size 16 --max_device_batch_size 8 --val_size 20")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["pretrain_seconds"] > 0 and report["finetune_seconds"] > 0
    assert report["total_seconds"] == report["pretrain_seconds"] + report["finetune_seconds"]
    lines = metrics(tmp_path / "tta" / "logs" / "classifier")
    assert report["best_acc"] == max(line["val_acc"] for line in lines[:-1])  # picked on the held-out images
    assert report["best_test_acc"] == lines[-1]["acc"] and report["final_epoch_acc"] == lines[-1]["last_epoch_acc"]
    assert load(tmp_path / "tta" / "classifier.pth")["model_config"]["emb_dim"] == 16  # the pretrained sizes
    assert report["pretrain_epochs_done"] == 1
    result = run("benchmarks/time_to_accuracy.py", "--data_dir", cifar_dir, "--out_dir", tmp_path / "short",
                 "--pretrain_epochs", 3, "--finetune_epochs", 2, "--pretrain_args",
                 " ".join(TINY_MAE + ["-bs", "16", "--max_device_batch_size", "8", "--stop_after_epoch", "1"]),
                 "--finetune_args", "--batch_size 16 --max_device_batch_size 8 --stop_after_epoch 1")
    assert_clean_error(result, 2, "the fine-tuning stopped before its last epoch")
    assert not (tmp_path / "short" / "report.json").exists()
    report["pretrain_epochs_done"], report["pretrain_epochs"] = 1, 3  # as a pretraining stopped after epoch 1
    (tmp_path / "tta" / "report.json").write_text(json.dumps(report))
    result = run("benchmarks/time_to_accuracy.py", "--summarize", tmp_path / "tta")
    assert result.stdout.splitlines()[1].split()[:5] == ["tta", "1", "of", "3", "epochs"]
    result = run("benchmarks/time_to_accuracy.py", "--data_dir", cifar_dir, "--out_dir", tmp_path / "bad",
                 "--pretrain_epochs", -1)
    assert_clean_error(result, 2, "--pretrain_epochs must not be negative")
    assert not (tmp_path / "bad").exists()
    # a bad fine-tuning flag ends the run before the pretraining, not after it
    tta = lambda *flags: run("benchmarks/time_to_accuracy.py", "--data_dir", cifar_dir, "--out_dir",
                             tmp_path / "bad", "--pretrain_epochs", 1, *flags)
    result = tta("--finetune_args", "--bs 16")
    assert result.returncode == 2 and "unrecognized arguments: --bs 16" in result.stderr.splitlines()[-1]
    assert_clean_error(tta("--finetune_args", "--label_smoothing 1"), 2, "--label_smoothing must lie in [0, 1)")
    assert_clean_error(tta("--finetune_args", "--randaug 'rand-m9"), 2, "--finetune_args: No closing quotation")
    assert_clean_error(tta("--pretrain_args", "--mask_ratio 1"), 2, "--mask_ratio must lie in (0, 1)")
    result = tta("--check")  # good flags: --check runs nothing, says nothing, exits 0
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert not (tmp_path / "bad").exists()


def recipe_calls(tmp_path, env):
    """Run benchmarks/gpu_recipe.sh with an interpreter that only logs its calls (shell-quoted, one per line) and
    refuses --drop_path in a --check, as time_to_accuracy.py does. -> (the script's result, its calls)."""
    fake, calls = tmp_path / "fake-python", tmp_path / f"calls-{len(list(tmp_path.glob('calls-*')))}"
    fake.write_text('#!/usr/bin/env bash\nprintf "%q " "$@" >> "$CALLS"; echo >> "$CALLS"\n'
                    'case "$*" in *--check*--drop_path*) echo "error: --drop_path" >&2; exit 2;; esac\n')
    fake.chmod(0o755)
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_recipe.sh")], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path, env={**env, "PYTHON": str(fake), "CALLS": str(calls)})
    return result, [shlex.split(line) for line in calls.read_text().splitlines()]


def test_gpu_recipe_runs_mae_probe_and_scratch_and_ends_with_their_table(tmp_path, cifar_dir):
    """The script's calls, logged, then each run in this process as the script would run it (no interpreter
    starts: nine of them took 45 s)."""
    small = "--batch_size 16 --max_device_batch_size 8 " + " ".join(TINY_MODEL)
    env = {**os.environ, **OFFLINE, "DATA": cifar_dir, "RUNS": str(tmp_path / "runs"), "PRE": "1", "FT": "1",
           "LP": "1", "FT_ARGS": small, "LP_ARGS": small,
           "PRE_ARGS": " ".join(TINY_MAE + ["-bs", "16", "--max_device_batch_size", "8"])}
    result, calls = recipe_calls(tmp_path, env)
    assert result.returncode == 0, result.stderr
    tta = os.path.join(ROOT, "benchmarks", "time_to_accuracy.py")
    assert [call[0] for call in calls] == [tta] * 7
    assert [("--check" in call, "--summarize" in call) for call in calls] == [(True, False)] * 3 + \
        [(False, False)] * 3 + [(False, True)]
    assert [[arg for arg in call if arg != "--check"] for call in calls[:3]] == calls[3:6]  # checks what runs
    for call in calls:
        out = run("benchmarks/time_to_accuracy.py", *call[1:])
        assert out.returncode == 0, out.stderr
    reports = {name: json.loads((tmp_path / "runs" / name / "report.json").read_text())
               for name in ("mae", "linear-probe", "scratch")}
    table = out.stdout.strip().splitlines()[-5:]
    assert table[0].split() == ["run", "pretraining", "fine-tuning", "minutes", "top-1", "last", "epoch"]
    assert table[1].split()[:3] == ["mae", "1", "epochs"] and table[1].split()[-2:] == [
        f"{reports['mae']['best_test_acc']:.2%}", f"{reports['mae']['final_epoch_acc']:.2%}"]
    assert "linear probe" in table[2] and str(tmp_path / "runs" / "mae" / "mae.pth") in table[2]
    assert table[3].startswith("scratch") and "none (scratch)" in table[3]
    result = run("benchmarks/time_to_accuracy.py", "--summarize", tmp_path / "runs" / "nope")
    assert_clean_error(result, 2, "report.json", "is " + str(tmp_path / "runs" / "nope"))
    # a bad flag of the probe, the second run, ends the script before the first has pretrained
    probe_check = calls[1][1:-1] + [calls[1][-1] + " --drop_path 0.1"]  # its --finetune_args come last
    assert_clean_error(run("benchmarks/time_to_accuracy.py", *probe_check), 2, "--drop_path would have nothing")
    typo = {**env, "RUNS": str(tmp_path / "typo"), "LP_ARGS": small + " --drop_path 0.1"}
    result, calls = recipe_calls(tmp_path, typo)
    assert result.returncode == 2 and result.stderr.strip() == "error: --drop_path"
    assert len(calls) == 2 and all("--check" in call for call in calls) and "--drop_path" in calls[1][-1]
    assert not (tmp_path / "typo").exists()


def test_cifar100_batches_train_a_100_class_classifier(tmp_path):
    data = write_cifar100(str(tmp_path / "data"))
    result, ckpt_path, _ = classify(tmp_path, data, *TINY_MODEL, "--total_epoch", 1)
    assert result.returncode == 0, result.stderr
    ckpt = load(ckpt_path)
    assert ckpt["model_config"]["num_classes"] == 100 and ckpt["model"]["head.weight"].shape == (100, 16)
    assert ckpt["classes"][:2] == ["fine00", "fine01"] and "fine99" in result.stdout  # the per-class table
    with open(os.path.join(data, "cifar-100-python", "train"), "r+b") as f:
        f.truncate(100)
    result, _, _ = classify(tmp_path, data, *TINY_MODEL, "--total_epoch", 1, name="broken")
    assert_clean_error(result, 2, "cifar-100-python/train: the file is corrupt or truncated")


def test_classifier_holds_pretrained_encoder_weights(tmp_path, cifar_dir):
    import train_classifier
    result, mae_path, _ = pretrain(tmp_path, cifar_dir)
    assert result.returncode == 0, result.stderr
    mae = load(mae_path)
    args = train_classifier.get_args_parser().parse_args(["--pretrained_model_path", str(mae_path)])
    take_saved(args, train_classifier.get_args_parser(), mae["model_config"], "mae", fixed=mae["model_config"])
    task = train_classifier.Classification(args, None, (mae, None))
    model, config = task.build_model(None, SimpleNamespace(classes=list("abcdefghij"))), task.config
    assert config["emb_dim"] == 16 and config["encoder_layer"] == 2
    state = model.state_dict()
    encoder = {k[len("encoder."):]: v for k, v in mae["model"].items() if k.startswith("encoder.")}
    assert encoder.keys() <= state.keys()
    for key, value in encoder.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("loader", ["torch", "device"])
def test_randaug_and_random_erasing_on_both_loader_paths(tmp_path, folder_dir, loader):
    result, ckpt, logs = classify(tmp_path, folder_dir, *TINY_MODEL, "--loader", loader, "--num_workers", 0,
                                  "--randaug", "rand-m9-mstd0.5-inc1", "--reprob", 0.25, "--interpolation", "bicubic",
                                  "--total_epoch", 1)
    assert result.returncode == 0, result.stderr
    assert load(ckpt)["epoch"] == 1


def test_recipe_flags_and_timm_export(tmp_path, cifar_dir):
    import timm
    result, mae_path, _ = pretrain(tmp_path, cifar_dir, "--norm_pix_loss", "--pos_embed", "sincos",
                                   "--decoder_emb_dim", 8)
    assert result.returncode == 0, result.stderr
    result, ckpt, _ = classify(tmp_path, cifar_dir, "--pretrained_model_path", mae_path, "--mixup", 0.8, "--cutmix",
                               1.0, "--label_smoothing", 0.1, "--drop_path", 0.1, "--layer_decay", 0.75,
                               "--clip_grad", 1.0, "--ema", "--ema_decay", 0.9, "--global_pool",
                               "--export_timm", tmp_path / "timm.pth")
    assert result.returncode == 0, result.stderr
    assert "timm.create_model('vit_tiny_patch16_224'" in result.stdout
    assert "note: --ema_decay 0.9 over 12 optimizer steps leaves 28% of the initial weights" in result.stdout
    best = load(ckpt)
    import train_classifier
    model = train_classifier.build_classifier(best["model_config"])
    model.load_state_dict(best["model"])
    model.eval()
    _, kwargs = classifier_export(model, best["model_config"])
    reference = timm.create_model(**kwargs)
    reference.load_state_dict(load(tmp_path / "timm.pth"), strict=True)
    reference.eval()
    x = torch.randn(3, 3, 8, 8)
    logits = model(x)  # of about 1e-4 with a fresh head: a tolerance relative to them, not an absolute 1e-5
    torch.testing.assert_close(reference(x), logits, rtol=1e-4, atol=1e-4 * logits.abs().max().item())
    last = load(tmp_path / "cls-last.pth")  # EMA weights saved apart from the live ones, and they differ
    assert not torch.equal(last["ema"]["head.weight"], last["model"]["head.weight"])


def test_linear_probe_leaves_encoder_bit_identical(tmp_path, cifar_dir, capsys):
    result, mae_path, _ = pretrain(tmp_path, cifar_dir)
    assert result.returncode == 0, result.stderr
    result, ckpt, _ = classify(tmp_path, cifar_dir, "--pretrained_model_path", mae_path, "--linear_probe",
                               "--weight_decay", 0.05)
    assert result.returncode == 0, result.stderr
    assert "training a classifier (linear probe), " in result.stdout
    encoder = {k[len("encoder."):]: v for k, v in load(mae_path)["model"].items() if k.startswith("encoder.")}
    trained = load(tmp_path / "cls-last.pth")["model"]
    for key, value in encoder.items():
        assert torch.equal(trained[key], value), key
    assert not torch.equal(trained["head.0.running_mean"], torch.zeros_like(trained["head.0.running_mean"]))
    # without a pretrained encoder it probes random features (a baseline, or a forgotten flag), and says so
    result, _, _ = classify(tmp_path, cifar_dir, *TINY_MODEL, "--linear_probe", "--total_epoch", 1, name="random",
                            capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "(linear probe of a randomly initialised encoder: no --pretrained_model_path), " in result.stdout


def test_the_readmes_python_block_loads_both_checkpoints(tmp_path, cifar_dir, capsys, monkeypatch):
    """The README's "Using checkpoints in Python" code, run as written, on tiny checkpoints of those names."""
    from PIL import Image
    with open(os.path.join(ROOT, "docs", "usage.md"), encoding="utf-8") as f:
        readme = f.read()
    code = readme.split("## Using checkpoints in Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    result, _, _ = pretrain(tmp_path, cifar_dir, name="vit-t-mae", capsys=capsys)
    assert result.returncode == 0, result.stderr
    result, _, _ = classify(tmp_path, cifar_dir, "--pretrained_model_path", "vit-t-mae.pth",
                            name="vit-t-classifier-from_pretrained", capsys=capsys)
    assert result.returncode == 0, result.stderr
    Image.new("RGB", (40, 30), (200, 120, 40)).save("cat.jpg")
    Image.new("L", (8, 8), 90).save("ship.png")  # grey, and already the model's size
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    classifier, x = namespace["classifier"], namespace["x"]
    assert x.shape == (2, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert namespace["features"].shape == (2, 1 + 16, 16) and namespace["pictures"].shape == (2, 3, 8, 8)
    names = [load(tmp_path / "vit-t-classifier-from_pretrained.pth")["classes"][i] for i in classifier(x).argmax(1)]
    assert out == f"{names}\n"


def test_reconstruction_figure_at_several_mask_ratios(tmp_path, cifar_dir, capsys, monkeypatch):
    from PIL import Image
    import numpy as np
    result, mae_path, _ = pretrain(tmp_path, cifar_dir, "--norm_pix_loss", capsys=capsys)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "fig.png"
    result = run("tools/reconstruct.py", mae_path, "--out", out, "--data_dir", cifar_dir, "--num_images", 4,
                 "--mask_ratios", 0.25, 0.5, 0.75)
    assert result.returncode == 0, result.stderr
    figure = Image.open(out)
    # 7 columns x 4 rows of 8-pixel images drawn 4 times as large (the default --scale), 1-pixel padding, under a
    # 14-pixel row of column labels
    assert figure.size == (7 * 33 + 1, 14 + 4 * 33 + 1)
    pixels = torch.from_numpy(np.asarray(figure.convert("RGB")).copy())
    assert (pixels[:14, 6 * 33:] < 128).any()  # the last column's label, "original", in dark text
    tile = pixels[15:47, 1 + 6 * 33:33 + 6 * 33]  # the original
    assert torch.equal(tile, tile[::4, ::4].repeat_interleave(4, 0).repeat_interleave(4, 1))  # 4 x 4 squares
    here = lambda *args: run_here(capsys, "tools/reconstruct.py", *args)  # the rest in this process
    given = [tmp_path / "a.png", tmp_path / "b.png"]
    for i, path in enumerate(given):
        Image.new("RGB", (20, 20), (40 * i, 100, 200)).save(path)
    result = here(mae_path, "--out", out, "--images", *given, "--mask_ratios", 0.5, "--scale", 1)
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (3 * 9 + 1, 14 + 2 * 9 + 1)
    before = out.read_bytes()
    result = here(mae_path, "--out", out, "--data_dir", cifar_dir, "--num_images", 0)
    assert_clean_error(result, 2, "--num_images must be positive, got 0")
    result = here(mae_path, "--out", out, "--data_dir", cifar_dir, "--scale", 0)
    assert_clean_error(result, 2, "--scale must be positive, got 0")
    assert out.read_bytes() == before
    # a typo that names the checkpoint is refused before anything is written; a new folder is made
    result = here(mae_path, "--out", mae_path, "--data_dir", cifar_dir)
    assert_clean_error(result, 2, "give a .png or .jpg file name")
    assert load(mae_path)["kind"] == "mae_pretrain"
    result = here(mae_path, "--out", tmp_path / "new" / "fig.jpg", "--data_dir", cifar_dir, "--num_images", 2,
                  "--mask_ratios", 0.5, "--scale", 1)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "new" / "fig.jpg").size == (3 * 9 + 1, 14 + 2 * 9 + 1)
    assert Image.open(tmp_path / "new" / "fig.jpg").format == "JPEG"  # the format follows the name
    # a full disk: one line, and the figure that was there stays whole (written to a temporary file first)
    def full_disk(image, fp, filename):
        fp.write(b"part of a PNG")
        raise OSError(28, "No space left on device")
    monkeypatch.setitem(Image.SAVE, "PNG", full_disk)  # PIL's writer of the format
    result = here(mae_path, "--out", out, "--data_dir", cifar_dir)
    assert_clean_error(result, 1, f"could not write {out} (No space left on device); the file that was there is "
                                  "unchanged")
    assert out.read_bytes() == before and not [name for name in os.listdir(tmp_path) if name.startswith(".fig")]


@pytest.mark.parametrize("script", ["mae_pretrain.py", "train_classifier.py", "tools/reconstruct.py",
                                    "tools/convert_legacy.py", "benchmarks/throughput.py",
                                    "benchmarks/time_to_accuracy.py", "benchmarks/step_bytes.py",
                                    "benchmarks/gpu_check.py", "tools/mutation_check.py"])
def test_every_flag_says_what_it_does(script):
    parser = script_module(script).get_args_parser()
    assert [action.dest for action in parser._actions if not action.help] == []
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)  # --help shows defaults


def test_offline_without_data_exits_2_with_message(tmp_path):
    data = tmp_path / "nothing" / "here"
    result = run("mae_pretrain.py", "--data_dir", data, *TINY_MAE, "--model_path", tmp_path / "m.pth",
                 "--log_dir", tmp_path / "logs")
    assert_clean_error(result, 2, str(data), "downloading it failed", "--data_dir")
    assert not (tmp_path / "nothing").exists() and not (tmp_path / "m.pth").exists()
    assert not (tmp_path / "logs").exists()  # nothing created before the data was found


@pytest.mark.skipif(not os.path.isfile(SHARED_CIFAR), reason="../shared/data/cifar10-jpeg.tar.gz not present")
def test_short_run_on_real_cifar_images(tmp_path):
    """A few hundred real CIFAR-10 JPEGs: 30 per class for training, 10 per class for testing."""
    data = tmp_path / "real"
    with tarfile.open(SHARED_CIFAR) as tar:
        by_class = {}
        for member in (m for m in tar.getmembers() if m.isfile()):
            parts = member.name.split("/")  # cifar10/<split>/<class>/<file>
            key = (parts[1], parts[2])
            if len(by_class.setdefault(key, [])) < (30 if parts[1] == "train" else 10):
                by_class[key].append(member)
        members = [m for ms in by_class.values() for m in ms]
        try:
            tar.extractall(data, members=members, filter="data")
        except TypeError:  # Python before 3.10.12 / 3.11.4 has no extraction filters
            tar.extractall(data, members=members)
    root = data / "cifar10"
    result, mae_path, _ = pretrain(tmp_path, root, "--image_size", 32, "--patch_size", 4, "--total_epoch", 1)
    assert result.returncode == 0, result.stderr
    result, _, logs = classify(tmp_path, root, "--pretrained_model_path", mae_path, "--total_epoch", 1)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(root / ".cache")) == ["test-32.pt", "train-32.pt"]  # decoded once, then cached
    with open(logs / "runs.jsonl") as f:
        seen = json.loads(f.readline())["data"]
    assert (seen["name"], seen["train_images"], seen["test_images"], seen["classes"]) == ("cifar10", 300, 100, 10)
    final = metrics(logs)[-1]
    assert final["final"] and list(final["per_class"]) == ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                           "frog", "horse", "ship", "truck"]
    assert final["acc"] == pytest.approx(sum(final["per_class"].values()) / 10)  # 10 test images per class
    assert final["acc"] <= final["acc5"] and final["acc"] * 100 == pytest.approx(round(final["acc"] * 100))


# ------------------------------------------------------------------------------------------- resume and faults

def test_pretraining_resume_is_bit_identical(tmp_path, cifar_dir):
    common = ["--total_epoch", 3]
    result, full, _ = pretrain(tmp_path, cifar_dir, *common, name="full")
    assert result.returncode == 0, result.stderr
    result, part, logs = pretrain(tmp_path, cifar_dir, *common, "--stop_after_epoch", 1, name="part")
    assert result.returncode == 0 and "--resume" in result.stdout, result.stderr
    assert load(part)["epoch"] == 1
    result = run("mae_pretrain.py", "--data_dir", cifar_dir, "--resume", part)
    assert result.returncode == 0, result.stderr
    a, b = load(full), load(part)
    assert b["epoch"] == 3
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"])
    assert [line["epoch"] for line in metrics(logs)] == [1, 2, 3]
    # one line per start: the command, the settings (the resumed start took them from the checkpoint), the code
    with open(logs / "runs.jsonl") as f:
        starts = [json.loads(line) for line in f]
    assert len(starts) == 2 and starts[1]["argv"][-2:] == ["--resume", str(part)]
    assert starts[0]["args"]["stop_after_epoch"] == 1 and starts[1]["args"]["total_epoch"] == 3
    assert starts[0]["args"]["emb_dim"] == starts[1]["args"]["emb_dim"] == 16
    assert starts[1]["torch"] == torch.__version__ and starts[1]["device"] == "cpu" and starts[1]["processes"] == 1
    assert starts[1]["commit"] is None or len(starts[1]["commit"].split("-")[0]) == 40
    data = starts[1]["data"]  # which data: the same in both starts, down to the pixels
    assert data == starts[0]["data"] and data["dir"] == os.path.abspath(cifar_dir) and data["name"] == "cifar10"
    assert (data["train_images"], data["test_images"], data["classes"]) == (100, 20, 10)
    assert len(data["fingerprint"]) == 16
    assert "run/text_summary" in events(logs).Tags()["tensors"]  # the same as text in TensorBoard
    result, _, logs = pretrain(tmp_path, cifar_dir, "--overwrite", name="part")  # a new run starts the file again
    assert result.returncode == 0, result.stderr
    with open(logs / "runs.jsonl") as f:
        assert len(f.readlines()) == 1


def test_resume_on_other_images_says_so_and_on_a_moved_copy_does_not(tmp_path, cifar_dir, capsys, monkeypatch):
    from torchvision.datasets import CIFAR10
    monkeypatch.chdir(tmp_path)  # a run folder of its own, outside the repository
    result, part, _ = pretrain(tmp_path, cifar_dir, "--total_epoch", 4, "--stop_after_epoch", 1, "--device", "cpu",
                               capsys=capsys)
    assert result.returncode == 0, result.stderr
    script = os.path.join(ROOT, "mae_pretrain.py")  # the command works from here: the script's whole path
    assert f"resume with: python {script} --resume {part} --device cpu\n" in result.stdout  # its data comes along
    saved = load(part)["data"]  # which data the checkpoint was trained on, as plain values
    assert saved["dir"] == os.path.abspath(cifar_dir) and saved["train_images"] == 100
    # without --data_dir the run's own (not the default, data/ in another working folder: nothing there); each
    # resume below gives --device cpu, as the printed command does (without it, the CPU note would be on stderr)
    monkeypatch.chdir(tmp_path / "logs")
    monkeypatch.setattr(CIFAR10, "url", "http://localhost:9/nowhere.tar.gz")  # a download would fail at once
    result = run_here(capsys, "mae_pretrain.py", "--resume", part, "--stop_after_epoch", 2, "--device", "cpu")
    assert result.returncode == 0 and "note:" not in result.stderr, result.stderr
    assert load(part)["epoch"] == 2 and load(part)["data"] == saved
    monkeypatch.undo()
    moved = shutil.copytree(cifar_dir, tmp_path / "moved")  # the same images in another folder: no note
    result = run_here(capsys, "mae_pretrain.py", "--data_dir", moved, "--resume", part, "--stop_after_epoch", 3,
                      "--device", "cpu")
    assert result.returncode == 0 and "note:" not in result.stderr, result.stderr
    other = write_cifar_batches(str(tmp_path / "other"), seed=7)  # same classes and sizes, other images
    result = run_here(capsys, "mae_pretrain.py", "--data_dir", other, "--resume", part, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert f"note: {os.path.abspath(other)} holds other data than {part} was trained on" in result.stderr
    assert load(part)["data"]["fingerprint"] != saved["fingerprint"]  # from here on it trained on those


def test_resume_auto_starts_fresh_then_goes_on_from_the_runs_own_checkpoint(tmp_path, cifar_dir, capsys):
    # (auto only picks the path: what a resume restores is checked bit for bit by the tests below)
    job = lambda *extra: pretrain(tmp_path, cifar_dir, *extra, name="part", capsys=capsys)  # in this process
    # a job slot too short for a second epoch: it stops after the first, and saves although --save_every is 5
    result, part, _ = job("--resume", "auto", "--stop_after_minutes", 1e-6, "--save_every", 5)
    assert result.returncode == 0 and "resumed" not in result.stdout, result.stderr  # nothing there yet: fresh
    assert "stopping after epoch 1 since another epoch (about " in result.stdout
    assert "would end past --stop_after_minutes 1e-06" in result.stdout and f"--resume {part}" in result.stdout
    assert load(part)["epoch"] == 1
    result, part, _ = job("--resume", "auto")  # the same job, again
    assert result.returncode == 0 and f"resumed {part} after epoch 1" in result.stdout, result.stderr
    assert load(part)["epoch"] == 2
    before = part.read_bytes()
    result, part, _ = job("--resume", "auto")  # once more: it is done
    assert result.returncode == 0 and f"{part} has finished all 2 epochs: nothing to train" in result.stdout
    assert "amp off, compile False" in result.stdout and part.read_bytes() == before
    # an attempt that logged epochs but was preempted before its first checkpoint (say --save_every 10): the
    # re-submitted job starts afresh over its own logs, where a new run without auto would be refused
    part.unlink()
    result, _, _ = job()
    assert_clean_error(result, 2, "already holds the logs of a run")
    result, part, logs = job("--resume", "auto")
    assert result.returncode == 0 and "resumed" not in result.stdout, result.stderr
    assert load(part)["epoch"] == 2 and [line["epoch"] for line in metrics(logs)] == [1, 2]
    # the classifier finds its -last.pth from the same flags
    result, _, _ = classify(tmp_path, cifar_dir, *TINY_MODEL, "--resume", "auto", "--stop_after_minutes", 1e-6,
                            capsys=capsys)
    assert result.returncode == 0 and "resumed" not in result.stdout, result.stderr
    assert "stopping after epoch 1 since another epoch" in result.stdout
    result, _, logs = classify(tmp_path, cifar_dir, *TINY_MODEL, "--resume", "auto", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert f"resumed {tmp_path / 'cls-last.pth'} after epoch 1" in result.stdout
    assert load(tmp_path / "cls-last.pth")["epoch"] == 2
    report = metrics(logs)[-1]
    assert report["final"] and report["last_epoch_acc"] == metrics(logs)[1]["val_acc"]
    result, _, logs = classify(tmp_path, cifar_dir, *TINY_MODEL, "--resume", "auto", capsys=capsys)  # done: it
    assert result.returncode == 0 and "best accuracy" in result.stdout, result.stderr  # reports again, once
    assert f"{tmp_path / 'cls-last.pth'} has finished all 2 epochs: nothing to train" in result.stdout
    assert [(line["epoch"], "final" in line) for line in metrics(logs)] == [(1, False), (2, False), (2, True)]
    assert metrics(logs)[-1] == report  # the same report, the last epoch's accuracy included
    assert [e.step for e in events(logs).Images("cls/confusion")] == [2]  # and one confusion image, not two


def test_resume_keeps_the_monitors_and_the_export_of_the_run(tmp_path, cifar_dir, capsys):
    """`--resume PATH` alone, as printed after a stop, goes on watching and exporting as the run began."""
    result, part, logs = pretrain(tmp_path, cifar_dir, "--total_epoch", 3, "--knn_every", 1, "--knn_k", 5,
                                  "--image_every", 2, "--stop_after_epoch", 1, capsys=capsys)
    assert result.returncode == 0, result.stderr
    result = run_here(capsys, "mae_pretrain.py", "--resume", part)
    assert result.returncode == 0 and "kNN" in result.stdout.splitlines()[-2], result.stderr
    assert ["knn_acc" in line for line in metrics(logs)] == [True, True, True]
    assert [e.step for e in events(logs).Images("mae_image")] == [2, 3]
    assert {key: load(part)["args"][key] for key in ("knn_every", "knn_k", "image_every")} == {
        "knn_every": 1, "knn_k": 5, "image_every": 2}
    # the classifier's --export_timm, written at the end: by the resumed run, and again when the finished run
    # is resumed again (a re-submitted job with --resume auto), while another existing file is still refused
    job = ("--export_timm", tmp_path / "timm.pth", *TINY_MODEL)
    result, _, _ = classify(tmp_path, cifar_dir, *job, "--stop_after_epoch", 1, capsys=capsys)
    assert result.returncode == 0 and not (tmp_path / "timm.pth").exists(), result.stderr
    result = run_here(capsys, "train_classifier.py", "--resume", tmp_path / "cls-last.pth")
    assert result.returncode == 0 and (tmp_path / "timm.pth").exists(), result.stderr
    (tmp_path / "timm.pth").write_bytes(b"")
    result, _, _ = classify(tmp_path, cifar_dir, *job, "--resume", "auto", capsys=capsys)
    assert result.returncode == 0 and "has finished all 2 epochs" in result.stdout, result.stderr
    assert load(tmp_path / "timm.pth").keys() == load(tmp_path / "cls.pth")["model"].keys()  # written again
    (tmp_path / "other.pth").write_bytes(b"mine")
    result = run_here(capsys, "train_classifier.py", "--resume", tmp_path / "cls-last.pth", "--export_timm",
                      tmp_path / "other.pth")
    assert_clean_error(result, 2, f"--export_timm {tmp_path / 'other.pth'} already exists; pass --overwrite")
    assert (tmp_path / "other.pth").read_bytes() == b"mine"


def test_a_checkpoint_saved_mid_epoch_resumes_only_on_data_of_its_size(tmp_path, cifar_dir, capsys):
    result, ckpt, _ = pretrain(tmp_path, cifar_dir, "--total_epoch", 1, capsys=capsys)
    assert result.returncode == 0, result.stderr
    state = load(ckpt)  # as a Ctrl-C after step 2 of epoch 1 leaves it: the epoch's order, steps and sums
    state.update(epoch=0, step=2, epoch_state={"order": torch.randperm(100), "step": 2,
                                                "sums": torch.tensor([4.0, 32.0], dtype=torch.float64)})
    state["args"]["total_epoch"] = 2
    torch.save(state, tmp_path / "mid.pth")
    other = write_cifar_batches(str(tmp_path / "other"), per_batch=24)  # 120 training images
    before = (tmp_path / "mid.pth").read_bytes()
    result = run_here(capsys, "mae_pretrain.py", "--resume", tmp_path / "mid.pth", "--data_dir", other)
    assert_clean_error(result, 2, "in the middle of an epoch over 100 training images, and there are 120 now")
    assert (tmp_path / "mid.pth").read_bytes() == before
    result = run_here(capsys, "mae_pretrain.py", "--resume", tmp_path / "mid.pth", "--data_dir", cifar_dir)
    assert result.returncode == 0 and "resumed" in result.stdout and "(+2 steps)" in result.stdout, result.stderr


@pytest.mark.parametrize("loader", ["device", "torch"])
def test_classifier_resume_is_bit_identical(tmp_path, cifar_dir, loader):
    """On the DataLoader path, also with another number of workers in each part."""
    flags = [*TINY_MODEL, "--total_epoch", 3, "--ema", "--ema_decay", 0.9, "--mixup", 0.5, "--cutmix", 0.5,
             "--drop_path", 0.1, "--layer_decay", 0.8, "--randaug", "rand-m9-mstd0.5-inc1", "--reprob", 0.25,
             "--loader", loader]
    result, _, full_logs = classify(tmp_path, cifar_dir, *flags, "--num_workers", 2, name="full")
    assert result.returncode == 0, result.stderr
    result, _, _ = classify(tmp_path, cifar_dir, *flags, "--num_workers", 0, "--stop_after_epoch", 1, name="part")
    assert result.returncode == 0, result.stderr
    os.remove(tmp_path / "part.pth")  # the -last file alone resumes: it holds the best weights too
    result = run("train_classifier.py", "--data_dir", cifar_dir, "--resume", tmp_path / "part-last.pth",
                 "--num_workers", 1)
    assert result.returncode == 0, result.stderr
    a, b = load(tmp_path / "full-last.pth"), load(tmp_path / "part-last.pth")
    for key in ("model", "ema", "best_model"):
        assert_same_tensors(a[key], b[key], key)
    assert a["best_acc"] == b["best_acc"] and a["best_epoch"] == b["best_epoch"]
    best_full, best_part = load(tmp_path / "full.pth"), load(tmp_path / "part.pth")
    assert_same_tensors(best_full["model"], best_part["model"])
    assert best_full["epoch"] == best_part["epoch"] == a["best_epoch"]
    if loader == "device":  # --eval_only of a training state evaluates what its run evaluated last: the EMA
        result = run("train_classifier.py", "--data_dir", cifar_dir, "--eval_only", tmp_path / "full-last.pth")
        assert result.returncode == 0, result.stderr
        assert "evaluating its EMA weights after epoch 3" in result.stdout
        assert f"top-1 {metrics(full_logs)[2]['val_acc']:.2%}" in result.stdout


@pytest.mark.parametrize("loader,at_step", [("device", 4), ("torch", 4), ("device", 6)])
def test_classifier_interrupted_mid_epoch_resumes_bit_identical(tmp_path, cifar_dir, capsys, monkeypatch, loader,
                                                                at_step):
    """Ctrl-C after optimizer step 4 of epoch 1 (of 6), or after its last step, before its evaluation: the
    epoch's order, sums, EMA and every RNG stream (mixup's numpy, the augmentation's generator or per-image
    seeds) carry over."""
    flags = [*TINY_MODEL, "--ema", "--ema_decay", 0.9, "--mixup", 0.5, "--cutmix", 0.5, "--drop_path", 0.1,
             "--randaug", "rand-m9-mstd0.5-inc1", "--reprob", 0.25, "--loader", loader, "--num_workers", 0]
    result, _, full_logs = classify(tmp_path, cifar_dir, *flags, name="full", capsys=capsys)
    assert result.returncode == 0, result.stderr
    interrupt_at_step(monkeypatch, at_step)
    result, best, part_logs = classify(tmp_path, cifar_dir, *flags, name="part", capsys=capsys)
    monkeypatch.undo()
    assert result.returncode == 130 and "Resume with: python train_classifier.py --resume" in result.stderr
    last = tmp_path / "part-last.pth"
    assert (load(last)["epoch"], load(last)["epoch_state"]["step"]) == (0, at_step) and not best.exists()
    result = run_here(capsys, "train_classifier.py", "--data_dir", cifar_dir, "--resume", last)
    assert result.returncode == 0 and f"resumed {last} after epoch 0 (+{at_step} steps)" in result.stdout, \
        result.stderr
    a, b = load(tmp_path / "full-last.pth"), load(last)
    for key in ("model", "ema", "best_model"):
        assert_same_tensors(a[key], b[key], key)
    untimed = lambda logs: [{k: v for k, v in line.items() if k not in ("images_per_s", "seconds")}
                            for line in metrics(logs)]
    assert untimed(part_logs) == untimed(full_logs)  # the same epoch averages, accuracies and report
    if at_step == 6:  # the resumed start trained no step of epoch 1: nothing to time
        assert metrics(part_logs)[0]["images_per_s"] is None and "images/s not timed" in result.stdout


def test_progress_bars_into_a_log_file_redraw_once_a_minute(capsys, monkeypatch):
    """`nohup python mae_pretrain.py > run.log 2>&1`: each redraw stays in the file, so a bar that is not on a
    terminal draws at its start and end (and every 60 s), where a terminal's redraws every second."""
    for _ in progress_bar(range(50), desc="epoch 1/1"):
        time.sleep(0.01)  # half a second: five redraws at tqdm's default, one a second on a terminal
    draws = capsys.readouterr().err.split("\r")
    assert [d for d in draws if "epoch 1/1" in d] == [draws[1]] and "0/50" in draws[1]  # the first draw only
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress_bar(range(1)).mininterval == 1.0


def test_a_class_folder_whose_name_is_not_utf8_trains_reports_and_evaluates(tmp_path):
    """A tree unzipped from an archive made with another code page: Python reads the name b"avi\\xf3n" as
    "avi\\udcf3n", which a strict UTF-8 stdout (PYTHONIOENCODING=utf-8, or an en_US.UTF-8 terminal) cannot print:
    the per-class table at the end of training raised UnicodeEncodeError."""
    data = write_image_folder(str(tmp_path / "folder"))
    for split in ("train", "test"):
        os.rename(os.fsencode(os.path.join(data, split, "airplane")), os.fsencode(os.path.join(data, split)) +
                  b"/avi\xf3n")
    strict = {"PYTHONIOENCODING": "utf-8"}
    ckpt, logs = tmp_path / "cls.pth", tmp_path / "logs"
    result = run("train_classifier.py", "--data_dir", data, *TINY_MODEL, "--batch_size", 16, "--total_epoch", 1,
                 "--warmup_epoch", 0, "--output_model_path", ckpt, "--log_dir", logs, env=strict)
    assert result.returncode == 0, result.stderr
    result = run("train_classifier.py", "--eval_only", ckpt, "--data_dir", data, env=strict)
    assert result.returncode == 0, result.stderr
    table = result.stdout.splitlines()
    rows = {line.split()[0]: line for line in table[table.index(next(x for x in table if x.startswith("class"))):]}
    assert "avi\\xf3n" in rows and rows["avi\\xf3n"].index("%") == rows["bird"].index("%")  # one column
    assert "avi\\xf3n" in metrics(logs)[-1]["per_class"]  # the logs hold the same readable name


def test_without_sighup_the_other_stop_signals_still_save():
    """Windows has no signal.SIGHUP: importing the scripts must not die of an AttributeError."""
    code = ("import signal; del signal.SIGHUP; from cifar_mae.stopping import STOP_SIGNALS, StopRequest; "
            "stop = StopRequest().__enter__(); signal.raise_signal(signal.SIGTERM); "
            "print([signal.Signals(s).name for s in STOP_SIGNALS], signal.Signals(stop.signum).name)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['SIGINT',", "'SIGTERM']", "SIGTERM"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(data, flags, weights) of a 30-epoch tiny pretraining run without a stop, which the signal tests match."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    torch.set_num_threads(1)  # as the interrupted process (OMP_NUM_THREADS=1): the same float sums
    data = write_cifar_batches(str(tmp / "data"), per_batch=16)
    flags = ["--data_dir", data, *TINY_MAE, "-bs", 4, "--total_epoch", 30, "--warmup_epoch", 1, "--log_interval", 1]
    result = run("mae_pretrain.py", *flags, "--model_path", tmp / "full.pth", "--log_dir", tmp / "logs-full")
    assert result.returncode == 0, result.stderr
    return data, flags, load(tmp / "full.pth")["model"]


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signal_saves_checkpoint_and_resume_matches_uninterrupted(tmp_path, uninterrupted, signum, code):
    data, flags, full = uninterrupted
    torch.set_num_threads(1)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **OFFLINE}
    part, ready = tmp_path / "part.pth", tmp_path / "ready"
    # 80 images in steps of 4: 20 steps an epoch; the signal comes before step 47, the 8th of epoch 3
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "paused_run.py"), "47", str(ready),
                             os.path.join(ROOT, "mae_pretrain.py"), *map(str, flags), "--model_path", str(part),
                             "--log_dir", str(tmp_path / "logs-part")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))  # also under nohup
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert f"python mae_pretrain.py --resume {part}" in stderr and "Traceback" not in stderr
    ckpt = load(part)
    assert ckpt["epoch"] == 2 and ckpt["epoch_state"]["step"] == 8
    result = run("mae_pretrain.py", "--resume", part, "--data_dir", data)
    assert result.returncode == 0, result.stderr
    assert_same_tensors(full, load(part)["model"])


def test_nonfinite_loss_stops_without_overwriting_checkpoint(tmp_path, cifar_dir):
    result, ckpt, _ = pretrain(tmp_path, cifar_dir)
    assert result.returncode == 0, result.stderr
    before = ckpt.read_bytes()
    result, _, _ = pretrain(tmp_path, cifar_dir, "--overwrite", "--base_learning_rate", 1e35, "--warmup_epoch", 0,
                            "--log_interval", 1)
    assert_clean_error(result, 3, "non-finite loss in epoch 1 at optimizer step")
    assert ckpt.read_bytes() == before


# ------------------------------------------------------------------------------------------- bad inputs

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny pretraining and classifier checkpoints and a set of broken inputs, made once for this module."""
    tmp = tmp_path_factory.mktemp("trained")
    data = write_cifar_batches(str(tmp / "data"))
    result, mae, _ = pretrain(tmp, data, "--total_epoch", 1)
    assert result.returncode == 0, result.stderr
    result, cls, cls_logs = classify(tmp, data, *TINY_MODEL, "--total_epoch", 1)
    assert result.returncode == 0, result.stderr
    world = {"data": data, "mae": mae, "cls": cls, "tmp": tmp, "cls_logs": cls_logs}
    world["truncated"] = tmp / "truncated.pth"
    world["truncated"].write_bytes(mae.read_bytes()[:1000])
    world["corrupt"] = tmp / "corrupt"
    shutil.copytree(data, world["corrupt"])
    with open(world["corrupt"] / "cifar-10-batches-py" / "data_batch_3", "r+b") as f:
        f.truncate(100)
    world["broken_image"] = tmp / "broken-image"
    write_image_folder(str(world["broken_image"]))
    world["bad_file"] = world["broken_image"] / "train" / "cat" / "0003.jpg"
    world["bad_file"].write_bytes(b"not a jpeg")
    world["no_classes"] = tmp / "no-classes"
    (world["no_classes"] / "train").mkdir(parents=True)
    (world["no_classes"] / "test").mkdir()
    world["empty_class"] = tmp / "empty-class"
    write_image_folder(str(world["empty_class"]))
    shutil.rmtree(world["empty_class"] / "train" / "dog")
    (world["empty_class"] / "train" / "dog").mkdir()
    world["packed"] = tmp / "packed"  # the dataset still in its archive (offline: no download to fall back on)
    world["packed"].mkdir()
    (world["packed"] / "cifar10-jpeg.tar.gz").write_bytes(b"an archive")
    world["nested"] = tmp / "nested"  # the dataset one folder down, as an archive unpacks
    shutil.copytree(data, world["nested"] / "cifar10")
    world["a_file"] = tmp / "a-file"
    world["a_file"].write_text("x")
    world["three_classes"] = tmp / "three-classes"
    write_image_folder(str(world["three_classes"]))
    for split in ("train", "test"):
        for name in os.listdir(world["three_classes"] / split):
            if name not in ("airplane", "bird", "cat"):
                shutil.rmtree(world["three_classes"] / split / name)
    return world


MAE_OUT = lambda w, t: ["--model_path", t / "new.pth", "--log_dir", t / "logs"]
CLS_OUT = lambda w, t: ["--output_model_path", t / "new-cls.pth", "--log_dir", t / "logs"]
BAD_INPUTS = {  # name: (script, argv from (world, tmp_path), what the error line must say)
    "checkpoint of an older format": ("mae", lambda w, t: (torch.save({"format": "cifar-mae/1"}, t / "old.pth"),
                                                           ["--eval_only", t / "old.pth"])[1],
                                      lambda w: "written by an older version of this project (cifar-mae/1, this one "
                                                "reads cifar-mae/2)"),
    "corrupt dataset file": ("mae", lambda w, t: ["--data_dir", w["corrupt"], *TINY_MAE, *MAE_OUT(w, t)],
                             lambda w: "data_batch_3"),
    "corrupt image": ("mae", lambda w, t: ["--data_dir", w["broken_image"], *TINY_MAE, *MAE_OUT(w, t)],
                      lambda w: str(w["bad_file"])),
    "no class folders": ("mae", lambda w, t: ["--data_dir", w["no_classes"], *TINY_MAE, *MAE_OUT(w, t)],
                         lambda w: "holds no class folders"),
    "empty class": ("mae", lambda w, t: ["--data_dir", w["empty_class"], *TINY_MAE, *MAE_OUT(w, t)],
                    lambda w: "'dog' holds no images"),
    "missing checkpoint": ("cls", lambda w, t: ["--data_dir", w["data"], "--pretrained_model_path", t / "nope.pth",
                                                *CLS_OUT(w, t)], lambda w: "does not exist"),
    "truncated checkpoint": ("cls", lambda w, t: ["--data_dir", w["data"], "--pretrained_model_path", w["truncated"],
                                                  *CLS_OUT(w, t)], lambda w: "truncated"),
    "classifier as pretrained": ("cls", lambda w, t: ["--data_dir", w["data"], "--pretrained_model_path", w["cls"],
                                                      *CLS_OUT(w, t)],
                                 lambda w: "is a classifier checkpoint, but an MAE pretraining or a MoCo pretraining "
                                           "checkpoint is needed"),
    "sizes differ from flags": ("cls", lambda w, t: ["--data_dir", w["data"], "--pretrained_model_path", w["mae"],
                                                     "--emb_dim", 32, *CLS_OUT(w, t)],
                                lambda w: "--emb_dim 32 conflicts"),
    "pretraining checkpoint to eval": ("cls", lambda w, t: ["--data_dir", w["data"], "--eval_only", w["mae"]],
                                       lambda w: "classifier checkpoint is needed"),
    "batch not multiple of micro": ("mae", lambda w, t: ["--data_dir", w["data"], *TINY_MAE, "-bs", 12,
                                                         "--max_device_batch_size", 8, *MAE_OUT(w, t)],
                                    lambda w: "not a multiple of the micro-batch"),
    "mask ratio": ("mae", lambda w, t: ["--data_dir", w["data"], *TINY_MAE, "--mask_ratio", 1.0, *MAE_OUT(w, t)],
                   lambda w: "--mask_ratio"),
    "mask ratio zero": ("mae", lambda w, t: ["--data_dir", w["data"], *TINY_MAE, "--mask_ratio", 0, *MAE_OUT(w, t)],
                        lambda w: "--mask_ratio must lie in (0, 1)"),
    "device other than cuda or cpu": ("cls", lambda w, t: ["--data_dir", w["data"], "--device", "mps",
                                                           *CLS_OUT(w, t)], lambda w: "--device 'mps': this project "
                                                                                      "runs on cuda or cpu only"),
    "image size vs patch": ("mae", lambda w, t: ["--data_dir", w["data"], *TINY_MAE, "--image_size", 9,
                                                 *MAE_OUT(w, t)], lambda w: "multiple of patch_size"),
    "unwritable model path": ("mae", lambda w, t: ["--data_dir", w["data"], *TINY_MAE, "--model_path",
                                                   w["a_file"] / "m.pth", "--log_dir", t / "logs"],
                              lambda w: "--model_path"),
    "unwritable log dir": ("cls", lambda w, t: ["--data_dir", w["data"], *TINY_MODEL, "--log_dir", w["a_file"] / "logs",
                                                "--output_model_path", t / "x.pth"], lambda w: "--log_dir"),
    "log dir of another run": ("cls", lambda w, t: ["--data_dir", w["data"], *TINY_MODEL, "--log_dir", w["cls_logs"],
                                                    "--output_model_path", t / "new-cls.pth"],
                               lambda w: f"--log_dir {w['cls_logs']} already holds the logs of a run"),
    "resume with conflicting flag": ("mae", lambda w, t: ["--data_dir", w["data"], "--resume", w["mae"],
                                                          "--emb_dim", 32], lambda w: "conflicts with"),
    "existing checkpoint": ("mae", lambda w, t: ["--data_dir", w["data"], *TINY_MAE, "--model_path", w["mae"]],
                            lambda w: f"already exists; pass --resume {w['mae']} to continue"),
    "existing classifier": ("cls", lambda w, t: ["--data_dir", w["data"], *TINY_MODEL, "--output_model_path", w["cls"],
                                                 "--log_dir", t / "logs"],
                            lambda w: f"already exists; pass --resume {w['tmp'] / 'cls-last.pth'} to continue"),
    "model path is a folder": ("mae", lambda w, t: ["--data_dir", w["data"], *TINY_MAE, "--model_path", w["tmp"],
                                                    "--log_dir", t / "logs"], lambda w: "is a folder, not a file"),
    "model path ending in a slash": ("cls", lambda w, t: ["--data_dir", w["data"], *TINY_MODEL, "--output_model_path",
                                                          f"{t / 'runs'}{os.sep}", "--log_dir", t / "logs"],
                                     lambda w: "names a folder (it ends with /); give a file name"),
    "resume from a folder": ("cls", lambda w, t: ["--data_dir", w["data"], "--resume", w["tmp"]],
                             lambda w: f"--resume {w['tmp']} is a folder, not a checkpoint file"),
    "timm export onto the run's own checkpoint": ("cls", lambda w, t: ["--data_dir", w["data"], *TINY_MODEL,
                                                                       "--export_timm", t / "new-cls.pth",
                                                                       *CLS_OUT(w, t)],
                                                  lambda w: "names this run's own checkpoint"),
    "resume from best weights": ("cls", lambda w, t: ["--data_dir", w["data"], "--resume", w["cls"]],
                                 lambda w: "holds only weights"),
    "batch larger than data": ("mae", lambda w, t: ["--data_dir", w["data"], *TINY_MAE, "-bs", 4096,
                                                    *MAE_OUT(w, t)], lambda w: "larger than the training set"),
    "stop after epoch 0": ("mae", lambda w, t: ["--data_dir", w["data"], *TINY_MAE, "--stop_after_epoch", 0,
                                                *MAE_OUT(w, t)], lambda w: "--stop_after_epoch must be positive"),
    "data dir is a file": ("mae", lambda w, t: ["--data_dir", w["truncated"], *TINY_MAE, *MAE_OUT(w, t)],
                           lambda w: "is a file, not a folder: pass the folder that holds the data"),
    "dataset one folder down": ("mae", lambda w, t: ["--data_dir", w["nested"], *TINY_MAE, *MAE_OUT(w, t)],
                                lambda w: f"holds no dataset itself, but {w['nested'] / 'cifar10'} does: pass "
                                          f"--data_dir {w['nested'] / 'cifar10'}"),
    "an image tree's split": ("cls", lambda w, t: ["--data_dir", w["broken_image"] / "train", *CLS_OUT(w, t)],
                              lambda w: f"pass the folder that holds it: --data_dir {w['broken_image']}"),
    "a class folder of a split": ("mae", lambda w, t: ["--data_dir", w["broken_image"] / "test" / "cat", *TINY_MAE,
                                                       *MAE_OUT(w, t)],
                                  lambda w: f"pass the folder that holds it: --data_dir {w['broken_image']}"),
    "dataset still packed": ("mae", lambda w, t: ["--data_dir", w["packed"], *TINY_MAE, *MAE_OUT(w, t)],
                             lambda w: f"holds no dataset, only the archive cifar10-jpeg.tar.gz: unpack it (for a "
                                       f".tar.gz: tar -xzf {w['packed'] / 'cifar10-jpeg.tar.gz'} -C {w['packed']})"),
    "warmup longer than the run": ("mae", lambda w, t: ["--data_dir", w["data"], *TINY_MAE, "--total_epoch", 100,
                                                        *MAE_OUT(w, t)],
                                   lambda w: "--warmup_epoch 200 is longer than --total_epoch 100: the learning rate "
                                             "would never reach its peak nor decay"),
    "kNN never due": ("mae", lambda w, t: ["--data_dir", w["data"], *TINY_MAE, "--total_epoch", 10, "--warmup_epoch",
                                           1, "--knn_every", 20, *MAE_OUT(w, t)],
                      lambda w: "--knn_every 20 is longer than --total_epoch 10: the kNN monitor would never run"),
    "no minutes to train": ("cls", lambda w, t: ["--data_dir", w["data"], "--stop_after_minutes", 0, *CLS_OUT(w, t)],
                            lambda w: "--stop_after_minutes must be positive"),
    "seed past torch's range": ("mae", lambda w, t: ["--data_dir", w["data"], *TINY_MAE, "--seed", 2 ** 64,
                                                    *MAE_OUT(w, t)], lambda w: "--seed must lie in [0, 2**63)"),
    "negative seed to the evaluation": ("cls", lambda w, t: ["--data_dir", w["data"], "--eval_only", w["cls"],
                                                             "--seed", -1], lambda w: "--seed must lie in"),
    "negative flag": ("cls", lambda w, t: ["--data_dir", w["data"], "--mixup", -1, *CLS_OUT(w, t)],
                      lambda w: "--mixup must not be negative"),
    "heads do not divide width, before the data": ("cls", lambda w, t: ["--data_dir", t / "no-data", "--emb_dim", 30,
                                                                       "--encoder_head", 4, *CLS_OUT(w, t)],
                                                   lambda w: "encoder width (30) must be divisible by its head count"),
    "erasing probability": ("cls", lambda w, t: ["--data_dir", w["data"], "--reprob", 1.5, *CLS_OUT(w, t)],
                            lambda w: "--reprob must lie in [0, 1]"),
    "bad randaug policy": ("cls", lambda w, t: ["--data_dir", w["data"], "--randaug", "rand-m9-q3",
                                                *CLS_OUT(w, t)], lambda w: "--randaug 'rand-m9-q3' is not a timm"),
    "evaluation on other classes": ("cls", lambda w, t: ["--data_dir", w["three_classes"], "--eval_only", w["cls"]],
                                    lambda w: "was trained on the classes ['airplane', 'automobile'"),
    "resume on other classes": ("cls", lambda w, t: ["--data_dir", w["three_classes"], "--resume",
                                                     w["tmp"] / "cls-last.pth"], lambda w: "but --data_dir has"),
    "evaluation at another size": ("cls", lambda w, t: ["--data_dir", w["data"], "--eval_only", w["cls"],
                                                        "--image_size", 16],
                                   lambda w: "--image_size 16 conflicts with --eval_only"),
    "timm export of an MAE without --eval_only": ("mae", lambda w, t: ["--data_dir", w["data"], *TINY_MAE,
                                                                       "--export_timm", t / "x.pth", *MAE_OUT(w, t)],
                                                  lambda w: "give the checkpoint with --eval_only"),
    "timm export over an existing file": ("mae", lambda w, t: ["--data_dir", w["data"], "--eval_only", w["mae"],
                                                               "--export_timm", w["cls"]],
                                          lambda w: f"--export_timm {w['cls']} already exists; pass --overwrite"),
    "classifier timm export over an existing file": ("cls", lambda w, t: ["--data_dir", w["data"], "--eval_only",
                                                                          w["cls"], "--export_timm", w["mae"]],
                                                     lambda w: "already exists; pass --overwrite"),
    "classifier to the MAE evaluation": ("mae", lambda w, t: ["--data_dir", w["data"], "--eval_only", w["cls"]],
                                         lambda w: "an MAE pretraining checkpoint is needed"),
    "MAE evaluation with another width": ("mae", lambda w, t: ["--data_dir", w["data"], "--eval_only", w["mae"],
                                                               "--decoder_layer", 3],
                                          lambda w: "--decoder_layer 3 conflicts with --eval_only"),
    "randaug op not on the device": ("cls", lambda w, t: ["--data_dir", w["data"], "--randaug", "rand-m9-t3a",
                                                          *CLS_OUT(w, t)], lambda w: "use --loader torch"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_ends_with_one_clear_line(case, tmp_path, trained, capsys):
    import mae_pretrain
    import train_classifier
    script, argv, fragment = BAD_INPUTS[case]
    module = mae_pretrain if script == "mae" else train_classifier
    good = {path: path.read_bytes() for path in (trained["mae"], trained["cls"], trained["cls_logs"] / "metrics.jsonl")}
    with pytest.raises(SystemExit) as exit_info:
        module.main(module.get_args_parser().parse_args([str(a) for a in argv(trained, tmp_path)]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert lines and lines[-1].startswith("error: ") and fragment(trained) in lines[-1], lines
    assert all(path.read_bytes() == content for path, content in good.items())
    assert not (tmp_path / "new.pth").exists() and not (tmp_path / "new-cls.pth").exists()


@pytest.mark.parametrize("script,flag", [("mae", "--log_dir"), ("mae", "--model_path"), ("cls", "--log_dir"),
                                         ("cls", "--output_model_path"), ("cls", "--export_timm")])
def test_an_output_that_cannot_be_created_is_refused_before_the_data_and_leaves_no_file(tmp_path, monkeypatch,
                                                                                       capsys, script, flag):
    """/proc/x: root may write almost anywhere, but no folder can be made in /proc."""
    import mae_pretrain
    import train_classifier
    module = mae_pretrain if script == "mae" else train_classifier
    checkpoint = "--model_path" if script == "mae" else "--output_model_path"
    outputs = {"--log_dir": tmp_path / "logs", checkpoint: tmp_path / "out.pth"}
    outputs[flag] = "/proc/x/out" if flag == "--log_dir" else "/proc/x/out.pth"
    argv = [*(TINY_MAE if script == "mae" else TINY_MODEL), "--device", "cpu",
            *(part for item in outputs.items() for part in item)]
    monkeypatch.setattr(lifecycle, "load_data", lambda *a, **k: pytest.fail("the data was read"))
    with pytest.raises(SystemExit) as exit_info:
        module.main(module.get_args_parser().parse_args(list(map(str, argv))))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: {flag} /proc/x/out") and "cannot create the folder /proc/x" in lines[0]
    assert os.listdir(tmp_path) == []  # no checkpoint, log or lock file
    assert not os.path.exists("/proc/x")


def test_legacy_whole_model_pickle_is_refused_then_converted(tmp_path, trained):
    from model import MAE_ViT
    legacy = tmp_path / "legacy.pt"
    torch.manual_seed(0)
    model = MAE_ViT(image_size=8, patch_size=2, emb_dim=16, encoder_layer=2, encoder_head=2, decoder_layer=1,
                    decoder_head=2)
    torch.save(model, legacy)  # what the original repository wrote
    result, _, _ = classify(tmp_path, trained["data"], "--pretrained_model_path", legacy)
    assert_clean_error(result, 2, "whole pickled model", "convert_legacy.py")
    converted = tmp_path / "converted.pth"
    result = run("tools/convert_legacy.py", legacy, converted)
    assert_clean_error(result, 2, "--execute_pickled_code")
    assert not converted.exists()
    result = run("tools/convert_legacy.py", legacy, converted, "--execute_pickled_code")
    assert result.returncode == 0, result.stderr
    ckpt = load(converted)
    assert ckpt["kind"] == "mae_pretrain"
    assert_same_tensors(ckpt["model"], model.state_dict())
    result, _, _ = classify(tmp_path, trained["data"], "--pretrained_model_path", converted, "--total_epoch", 1)
    assert result.returncode == 0, result.stderr
    assert f"encoder from {converted}: converted from legacy.pt, whose epochs are not recorded" in result.stdout


def test_convert_a_state_dict_without_running_code_and_refuse_what_needs_no_conversion(tmp_path, trained):
    from model import MAE_ViT
    torch.manual_seed(0)
    model = MAE_ViT(image_size=8, patch_size=2, emb_dim=16, encoder_layer=2, encoder_head=2, decoder_layer=1,
                    decoder_head=2)
    with torch.no_grad():
        model.encoder.pos_embed[:, 0] = 0  # the original's cls token had no position: converted as zeros
    original = {}  # the original repository's names for our weights; its decoder had no embed and no norm
    for key, value in model.state_dict().items():
        if key.startswith(("decoder.decoder_embed.", "decoder.norm.")):
            continue
        if key.endswith("pos_embed"):
            value = value.permute(1, 0, 2)[1:] if key.startswith("encoder.") else value.permute(1, 0, 2)
            key = key.replace("pos_embed", "pos_embedding")
        for ours, theirs in (("patch_embed.proj.", "patchify."), ("blocks.", "transformer."), ("norm.", "layer_norm.")):
            key = key.replace("." + ours, "." + theirs)
        original[key] = value
    source, converted = tmp_path / "state_dict.pt", tmp_path / "converted.pth"
    torch.save(original, source)
    result = run("tools/convert_legacy.py", source, converted)  # tensors only: no flag needed
    assert result.returncode == 0, result.stderr
    ckpt = load(converted)
    assert ckpt["kind"] == "mae_pretrain" and ckpt["model_config"]["encoder_layer"] == 2
    encoder = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    assert_same_tensors(encoder, {k: v for k, v in ckpt["model"].items() if k.startswith("encoder.")})
    # a state_dict has no head counts: width 16 / 64 gives 1, said so; the model had 2
    assert "1 encoder heads, 1 decoder heads" in result.stdout and "note: a state_dict does not record" in result.stdout
    result = run("tools/convert_legacy.py", source, converted)
    assert_clean_error(result, 2, "already exists", "--overwrite")
    result = run("tools/convert_legacy.py", source, converted, "--encoder_head", 3, "--overwrite")
    assert_clean_error(result, 2, "encoder width (16) must be divisible by its head count (3)")
    result = run("tools/convert_legacy.py", source, converted, "--encoder_head", 2, "--decoder_head", 2, "--overwrite")
    assert result.returncode == 0 and "note:" not in result.stdout, result.stderr
    ckpt = load(converted)
    restored = MAE_ViT(**ckpt["model_config"])
    restored.load_state_dict(ckpt["model"])
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(restored.encoder.forward_features(x), model.encoder.forward_features(x))
    result = run("tools/convert_legacy.py", converted, tmp_path / "again.pth")
    assert_clean_error(result, 2, "already a mae_pretrain checkpoint", "nothing to convert")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")  # a state_dict of some other model
    result = run("tools/convert_legacy.py", tmp_path / "other.pt", tmp_path / "other.pth")
    assert_clean_error(result, 2, "does not hold the original repository's")
    assert not (tmp_path / "other.pth").exists()
    result, _, _ = classify(tmp_path, trained["data"], "--pretrained_model_path", converted, "--total_epoch", 1)
    assert result.returncode == 0, result.stderr


class OriginalClassifier(torch.nn.Module):
    """The original repository's ViT_Classifier layout: its names, timm Blocks, no config attribute."""

    def __init__(self, emb_dim=16, heads=2, layers=2, num_classes=10):
        from timm.models.vision_transformer import Block
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, emb_dim))
        self.pos_embedding = torch.nn.Parameter(torch.randn(16, 1, emb_dim))
        self.patchify = torch.nn.Conv2d(3, emb_dim, 2, 2)
        self.transformer = torch.nn.Sequential(*[Block(emb_dim, heads) for _ in range(layers)])
        self.layer_norm = torch.nn.LayerNorm(emb_dim)
        self.head = torch.nn.Linear(emb_dim, num_classes)


def test_a_pickled_original_model_brings_its_head_counts(tmp_path, capsys):
    torch.save(OriginalClassifier(heads=2), tmp_path / "original.pt")  # width 16: width / 64 would say 1
    result = run_here(capsys, "tools/convert_legacy.py", tmp_path / "original.pt", tmp_path / "converted.pth",
                      "--execute_pickled_code")
    assert result.returncode == 0 and "classifier checkpoint, 2 encoder heads" in result.stdout, result.stderr
    assert "note:" not in result.stdout
    config = load(tmp_path / "converted.pth")["model_config"]
    assert (config["encoder_head"], config["encoder_layer"], config["num_classes"]) == (2, 2, 10)


def test_convert_original_parameter_names():
    """The original repository's names and (T, 1, D) position tables map onto ours."""
    from tools.convert_legacy import convert_state_dict
    original = {"encoder.cls_token": torch.zeros(1, 1, 4), "encoder.pos_embedding": torch.ones(16, 1, 4),
                "encoder.patchify.weight": torch.zeros(4, 3, 2, 2), "encoder.transformer.0.attn.qkv.weight":
                torch.zeros(12, 4), "encoder.layer_norm.weight": torch.ones(4),
                "decoder.pos_embedding": torch.ones(17, 1, 4), "decoder.mask_token": torch.zeros(1, 1, 4),
                "decoder.head.weight": torch.zeros(12, 4)}
    out = convert_state_dict(original)
    assert out["encoder.pos_embed"].shape == (1, 17, 4) and out["encoder.pos_embed"][0, 0].abs().sum() == 0
    assert out["decoder.pos_embed"].shape == (1, 17, 4)
    assert {"encoder.patch_embed.proj.weight", "encoder.blocks.0.attn.qkv.weight", "encoder.norm.weight",
            "decoder.decoder_embed.weight", "decoder.norm.weight"} <= out.keys()


# ------------------------------------------------------------------------------------------- multi-process

def one_and_two_processes(tmp_path, script, flags, out_flag):
    """The same run in one process and under torchrun in two: outputs one.pth / two.pth, logs-one / logs-two."""
    one = run(script, *flags, out_flag, tmp_path / "one.pth", "--log_dir", tmp_path / "logs-one")
    assert one.returncode == 0, one.stderr
    os.makedirs(tmp_path / "tmp")  # torchrun leaves a torchelastic_* folder of worker logs in the temp folder
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(ROOT, script), *map(str, flags),
                          out_flag, str(tmp_path / "two.pth"), "--log_dir", str(tmp_path / "logs-two")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, cifar_dir):
    # 4-image micro-batches: two per process, accumulated under DDP's no_sync, four in the one process
    flags = ["--data_dir", cifar_dir, *TINY_MODEL, "--batch_size", 16, "--max_device_batch_size", 4,
             "--total_epoch", 2, "--warmup_epoch", 1, "--crop_scale", 1, 1, "--no-flip", "--device", "cpu",
             "--stop_after_minutes", 1000]  # a time limit far off: the ranks take rank 0's clock, and go on
    one_and_two_processes(tmp_path, "train_classifier.py", flags, "--output_model_path")
    a, b = load(tmp_path / "one-last.pth"), load(tmp_path / "two-last.pth")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5, msg=key)
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    m1, m2 = metrics(tmp_path / "logs-one"), metrics(tmp_path / "logs-two")
    assert m1[1]["val_acc"] == m2[1]["val_acc"]  # evaluation gathered over both ranks
    assert m1[0]["train_loss"] == pytest.approx(m2[0]["train_loss"], rel=1e-5)


def test_two_process_pretraining_gathers_knn_features_like_one(tmp_path):
    """Odd split sizes, so the ranks' shards differ in length; an lr too small to move any weight keeps the
    encoder at its initial weights (rank 0's, broadcast by DDP), so kNN accuracy must match one process."""
    data = write_cifar_batches(str(tmp_path / "data"), per_batch=21, test=21, random_labels=True)
    flags = ["--data_dir", data, *TINY_MAE, "-bs", 16, "--max_device_batch_size", 8, "--total_epoch", 1,
             "--warmup_epoch", 0, "--base_learning_rate", 1e-30, "--knn_every", 1, "--knn_k", 5, "--device", "cpu"]
    one_and_two_processes(tmp_path, "mae_pretrain.py", flags, "--model_path")
    a, b = load(tmp_path / "one.pth"), load(tmp_path / "two.pth")
    for key in a["model"]:  # zero-initialised biases move by about lr, differently per run: 1e-31
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-20, msg=key)
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    m1, m2 = metrics(tmp_path / "logs-one")[0], metrics(tmp_path / "logs-two")[0]
    split = load_data(data, 8)
    train, test = (cls_features(tmp_path / "one.pth", images) for images in (split.train_images, split.test_images))
    expected = brute_force_knn(train, split.train_labels, test, split.test_labels, 10, 5, 0.07)
    assert m1["knn_acc"] == m2["knn_acc"] == expected and 0 < expected < 1  # random labels: neither 0 nor 1
    assert math.isfinite(m2["loss"])


def test_throughput_benchmark_tiny_preset_runs(capsys):
    result = run("benchmarks/throughput.py", "--preset", "tiny", "--steps", 1, "--warmup", 1, "--num_workers", 0)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    cases = [line["case"] for line in lines[:-1]]
    assert cases == ["data-plain", "data-fast", "pretrain-plain", "pretrain-fast", "finetune-plain", "finetune-fast"]
    pretrain_fast = lines[3]
    assert pretrain_fast["amp"] == "off"  # named as the scripts' --amp flag names it
    assert pretrain_fast["images_per_s"] > 0
    # the counted FLOPs agree with the textbook count: per block of T tokens of width D, 24 T D^2 (qkv, proj,
    # MLP) + 4 T^2 D (attention); backward twice forward, except the patch embedding's (no input gradient)
    c = pretrain_fast["config"]
    n, d, pix = (c["image_size"] // c["patch_size"]) ** 2, c["emb_dim"], 3 * c["patch_size"] ** 2
    block = lambda t: 24 * t * d * d + 4 * t * t * d
    visible = n // 4  # mask ratio 0.75
    pretrain = 3 * (c["encoder_layer"] * block(visible + 1) + 2 * (visible + 1) * d * d  # encoder, decoder_embed
                    + c["decoder_layer"] * block(n + 1) + 2 * n * d * pix) + 2 * 2 * n * pix * d  # decoder, head
    finetune = 3 * (c["encoder_layer"] * block(n + 1) + 2 * d * 10) + 2 * 2 * n * pix * d
    exact = lambda flops: pytest.approx(flops / 1e9, rel=1e-12)
    assert pretrain_fast["gflop_per_image"] == exact(pretrain) and lines[2]["gflop_per_image"] == exact(pretrain)
    assert lines[5]["gflop_per_image"] == exact(finetune) and lines[4]["gflop_per_image"] == exact(finetune)
    shares = pretrain_fast["flop_shares"]  # the FLOPs split between the modules, and attention's part
    attention = 3 * 4 * d * (c["encoder_layer"] * (visible + 1) ** 2 + c["decoder_layer"] * (n + 1) ** 2)
    assert set(shares) == {"encoder", "decoder", "attention"} and shares["attention"] == pytest.approx(
        attention / pretrain, rel=1e-12)
    assert shares["encoder"] + shares["decoder"] == pytest.approx(1.0)

    assert sum(v for k, v in lines[5]["flop_shares"].items() if k != "attention") == pytest.approx(1.0)
    assert lines[5]["flop_shares"]["blocks"] > 0.9  # fine-tuning: the 2 blocks, called one by one
    assert set(lines[-1]) == {"summary", "data", "pretrain", "finetune"}
    bench = lambda *args: run_here(capsys, "benchmarks/throughput.py", *args)  # the rest in this process
    result = bench("--preset", "tiny", "--steps", 1, "--warmup", 1, "--num_workers", 0, "--cases", "data",
                   "--randaug", "rand-m9-mstd0.5-inc1")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(line["case"], line["randaug"]) for line in lines[:-1]] == [("data-plain", "rand-m9-mstd0.5-inc1"),
                                                                        ("data-fast", "rand-m9-mstd0.5-inc1")]
    result = bench("--preset", "tiny", "--steps", 1, "--warmup", 1, "--cases", "data", "--paths", "fast")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["case"] for line in result.stdout.splitlines()] == ["data-fast"]  # no empty summary
    # --model changes the preset's model: a narrower decoder has fewer FLOPs and says so in its config
    result = bench("--preset", "tiny", "--steps", 1, "--warmup", 1, "--cases", "pretrain", "--paths", "fast",
                   "--model", "decoder_emb_dim=32", "decoder_layer=2")
    assert result.returncode == 0, result.stderr
    narrow = json.loads(result.stdout.splitlines()[0])
    assert narrow["config"]["decoder_emb_dim"] == 32 and narrow["config"]["decoder_layer"] == 2
    expected = pretrain_fast["gflop_per_image"] * (1 - pretrain_fast["flop_shares"]["decoder"])
    assert narrow["gflop_per_image"] * (1 - narrow["flop_shares"]["decoder"]) == pytest.approx(expected, rel=1e-6)
    assert narrow["gflop_per_image"] != pytest.approx(pretrain_fast["gflop_per_image"])
    for bad in ("emb_dim=31", "foo=1", "decoder_layer=0"):
        assert_clean_error(bench("--preset", "tiny", "--model", bad), 2, "--model")


def test_throughput_benchmark_counts_the_moco_step():
    """MoCo v3's step per image: two views, each through the query encoder, projector and predictor (forward and
    backward) and the key encoder and projector (forward only); then q . k over the batch both ways."""
    result = run("benchmarks/throughput.py", "--preset", "tiny", "--cases", "moco", "--paths", "fast", "--steps", 1,
                 "--warmup", 1, "--repeats", 1, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.splitlines()[0])
    c = line["config"]
    n, d, pix, h, out = (c["image_size"] // c["patch_size"]) ** 2, c["emb_dim"], 3 * c["patch_size"] ** 2, \
        c["moco_mlp_dim"], c["moco_dim"]
    block = lambda t: 24 * t * d * d + 4 * t * t * d
    encoder = c["encoder_layer"] * block(n + 1) + 2 * n * pix * d
    projector, predictor = 2 * (d * h + h * h + h * out), 2 * (out * h + h * out)
    query = 3 * (encoder + projector + predictor) - 2 * n * pix * d  # no gradient for the images
    batch = min(c["moco_micro"], 64)  # FLOPs are counted on one micro-batch of at most 64
    loss = 2 * 2 * (2 * batch * out)  # both directions; q . k forward and its gradient for q
    assert line["case"] == "moco-fast" and line["images_per_s"] > 0 and line["flop_shares"] is None
    assert line["gflop_per_image"] == pytest.approx((2 * (query + encoder + projector) + loss) / 1e9, rel=1e-12)


def test_gpu_throughput_script_runs_its_stages_and_refuses_unknown_ones(tmp_path):
    env = {**os.environ, "OUT_DIR": str(tmp_path / "out"), "STAGES": "crop", "OMP_NUM_THREADS": "1",
           "EXTRA": "--preset tiny --steps 1 --warmup 1", "PYTHON": sys.executable}
    script = os.path.join(ROOT, "benchmarks", "gpu_throughput.sh")
    result = subprocess.run(["bash", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    crop = [json.loads(line) for line in open(tmp_path / "out" / "crop.jsonl")]
    assert [(line["case"], line["interpolation"]) for line in crop if "case" in line] == [
        ("data-fast", "bilinear"), ("data-fast", "bicubic")]
    result = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60,
                            env={**env, "STAGES": "nope", "OUT_DIR": str(tmp_path / "typo")})
    assert result.returncode == 2 and "unknown stage 'nope'" in result.stderr
    result = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60,  # a typo in the last
                            env={**env, "STAGES": "crop nope", "OUT_DIR": str(tmp_path / "typo")})
    assert result.returncode == 2 and "unknown stage 'nope'" in result.stderr  # found before crop ran
    assert result.stdout == "" and not (tmp_path / "typo").exists()


def test_throughput_benchmark_profiles_where_the_time_goes(tmp_path):
    result = run("benchmarks/throughput.py", "--preset", "tiny", "--steps", 1, "--warmup", 1, "--cases", "pretrain",
                 "--paths", "fast", "--profile", 2, "--trace_dir", tmp_path / "traces")
    assert result.returncode == 0, result.stderr
    case, profile = [json.loads(line) for line in result.stdout.splitlines()]
    assert case["case"] == "pretrain-fast" and "profile" not in case
    assert profile["case"] == "pretrain-fast"
    summary = profile["profile"]
    assert summary["time"] == "cpu" and summary["ms_per_step"] > 0
    assert sum(summary["by_category"].values()) == pytest.approx(1.0)
    assert summary["by_category"]["matmul"] > 0 and summary["by_category"]["attention"] > 0
    names = [op["name"] for op in summary["top"]]
    assert "aten::mm" in names and len(names) == len(set(names))
    with open(tmp_path / "traces" / "pretrain-fast.json") as f:
        assert json.load(f)["traceEvents"]
    assert os.listdir(tmp_path / "traces") == ["pretrain-fast.json"]  # written under another name, then renamed
    bad = run("benchmarks/throughput.py", "--preset", "tiny", "--cases", "pretrain,segmentation")
    assert_clean_error(bad, 2, "--cases takes a comma-separated subset")


def test_a_resume_from_an_older_checkpoint_drops_the_later_epochs_from_both_logs(tmp_path, cifar_dir, monkeypatch,
                                                                                 capsys):
    due = checkpoint_due

    def crash_after_epoch_3(epoch, *settings):  # the process dies after logging epoch 3, before its checkpoint
        if epoch == 3:
            raise RuntimeError("simulated crash")
        return due(epoch, *settings)

    monkeypatch.setattr(lifecycle, "checkpoint_due", crash_after_epoch_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(tmp_path, cifar_dir, "--total_epoch", 4, "--save_every", 2, capsys=capsys)
    monkeypatch.undo()
    ckpt, logs = tmp_path / "mae.pth", tmp_path / "logs" / "mae"
    assert load(ckpt)["epoch"] == 2 and [line["epoch"] for line in metrics(logs)] == [1, 2, 3]
    # TensorBoard reads event files in name order: time in seconds, then a per-process counter written without
    # leading zeros (run 10 sorts before run 9). A resume is a later process; here, at least a later second
    time.sleep(1.01 - time.time() % 1)
    result = run_here(capsys, "mae_pretrain.py", "--data_dir", cifar_dir, "--resume", ckpt)
    assert result.returncode == 0 and f"resumed {ckpt} after epoch 2" in result.stdout, result.stderr
    lines = metrics(logs)
    assert [line["epoch"] for line in lines] == [1, 2, 3, 4]
    losses = events(logs).Scalars("mae_loss")  # TensorBoard: epoch 3 once, from the resumed run
    assert [event.step for event in losses] == [1, 2, 3, 4]
    assert [event.value for event in losses] == pytest.approx([line["loss"] for line in lines], rel=1e-6)


def test_save_every_writes_fewer_checkpoints(tmp_path, cifar_dir, monkeypatch):
    import mae_pretrain
    written = []
    save = save_atomic
    monkeypatch.setattr(lifecycle, "save_atomic",
                        lambda obj, path: (written.append(obj.get("epoch")), save(obj, path)))
    args = mae_pretrain.get_args_parser().parse_args([str(a) for a in (
        "--data_dir", cifar_dir, *TINY_MAE, "-bs", 16, "--total_epoch", 5, "--warmup_epoch", 1, "--save_every", 2,
        "--model_path", tmp_path / "m.pth", "--log_dir", tmp_path / "logs")])
    mae_pretrain.main(args)
    assert written == [2, 4, 5]
    assert load(tmp_path / "m.pth")["epoch"] == 5
