"""Recipe files (-c), named model sizes, the recipe knobs (--mix_prob, --tta) and the figures people read."""
import os
import re
import shlex

import numpy as np
import pytest
import torch

import mae_pretrain
import moco_pretrain
import train_classifier
from cifar_mae import lifecycle
from cifar_mae.classification import ClassificationLoss, confusion_image, confusion_table, evaluate
from cifar_mae.datasets import ImageData, spread_test_images
from cifar_mae.loaders import DeviceLoader
from cifar_mae.runtime import Runtime
from cifar_mae.settings import resolve_settings
from conftest import CLASSES, ROOT, TINY_MAE, TINY_MODEL, write_cifar_batches
from model import MODELS, build_classifier

CPU = Runtime(torch.device("cpu"))


def parse(script, *argv):
    return script.get_args_parser().parse_args(list(map(str, argv)))


def test_a_recipe_file_sets_defaults_and_flags_given_win(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("total_epoch: 30\nbase_learning_rate: 1e-3\ncrop_scale: [0.5, 1]\nflip: false\n"
                      "model: vit_mini_patch4\n")
    args = parse(mae_pretrain, "-c", recipe, "--total_epoch", 5)
    assert (args.total_epoch, args.base_learning_rate, args.crop_scale, args.flip, args.model) == \
        (5, 1e-3, [0.5, 1.0], False, "vit_mini_patch4")
    assert args.config == str(recipe) and parse(mae_pretrain).total_epoch == 2000  # a new parser: no leftovers


def test_settings_are_resolved_once_in_order_then_frozen(tmp_path):
    """Recipe, named size, output names and folders are filled in by resolve_settings; after it nothing assigns."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: vit_mini_patch4\ntotal_epoch: 3\nwarmup_epoch: 1\n")
    parser = train_classifier.get_args_parser()
    args = parser.parse_args(["-c", str(recipe), "--emb_dim", "48", "--data_dir", str(tmp_path / "d")])
    settings, ckpt, restarting, defaults = resolve_settings(args, parser, train_classifier.Classification)
    assert (ckpt, restarting, defaults) == (None, False, (None, None))
    assert (settings.total_epoch, settings.emb_dim, settings.patch_size, settings.encoder_layer) == \
        (3, 48, MODELS["vit_mini_patch4"]["patch_size"], MODELS["vit_mini_patch4"]["encoder_layer"])
    assert settings.output_model_path == "vit-mini-patch4-classifier-from_scratch.pth"
    assert settings.log_dir == os.path.join("logs", "cifar10", "vit-mini-patch4-classifier-from_scratch")  # to download
    with pytest.raises(AttributeError, match="total_epoch cannot change after that"):
        settings.total_epoch = 4
    assert settings.total_epoch == 3


def test_every_flag_of_every_job_is_documented():
    """docs/usage.md (with contrastive.md for MoCo's and your_data_your_backbone.md for the backbones' flags) is
    where a reader finds every setting and its default: a flag added to a parser and not there fails here."""
    docs = "".join(open(os.path.join(ROOT, "docs", name), encoding="utf-8").read()
                   for name in ("usage.md", "contrastive.md", "your_data_your_backbone.md"))
    for script in (mae_pretrain, moco_pretrain, train_classifier):
        flags = [action.option_strings for action in script.get_args_parser()._actions if action.dest != "help"]
        missing = [names[-1] for names in flags
                   if not any(re.search(rf"(?<![\w-]){name}(?![\w-])", docs) for name in names)]
        assert not missing, (script.__name__, missing)


@pytest.mark.parametrize("text,message", [
    ("total_epoch: abc", "total_epoch: invalid literal for int()"),
    ("no_such_flag: 1", "'no_such_flag' is not a flag of this script"),
    ("- 1\n- 2", "holds a list, not a mapping of flag names to values"),
    ("flip: 3", "flip: takes true or false, not 3"),
    ("crop_scale: 0.5", "crop_scale: takes a list of 2 values"),
    ("model: vit_huge", "model: 'vit_huge' is neither a named size (vit_tiny_patch2, "),
    ("a: [b", "is not YAML"),
])
def test_a_bad_recipe_file_is_refused_in_one_line(tmp_path, capsys, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        parse(train_classifier, "-c", recipe)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: -c {recipe}") \
        and message in err[0], err
    with pytest.raises(SystemExit):
        parse(train_classifier, "-c", tmp_path / "missing.yaml")
    assert capsys.readouterr().err.strip() == f"error: -c {tmp_path / 'missing.yaml'}: No such file or directory"


def test_named_sizes_and_a_size_flag_that_overrides_one_value(tmp_path, monkeypatch):
    data = write_cifar_batches(str(tmp_path / "data"), per_batch=4, test=10)
    monkeypatch.chdir(tmp_path)
    seen = {}

    def first_epoch(trainer, model, *args, **kwargs):  # where the run has built everything: stop it there
        seen.update(model=model)
        raise KeyboardInterrupt

    monkeypatch.setattr(lifecycle.Trainer, "train_epoch", first_epoch)
    with pytest.raises(SystemExit):  # cli_main: 130, as a Ctrl-C
        mae_pretrain.main(parse(mae_pretrain, "--data_dir", data, "--model", "vit_mini_patch4", "--encoder_layer", 1,
                                "-bs", 16, "--total_epoch", 1, "--warmup_epoch", 0, "--device", "cpu"))
    expected = dict(MODELS["vit_mini_patch4"], encoder_layer=1)
    assert {key: seen["model"].config[key] for key in expected} == expected
    assert os.listdir(tmp_path / "logs" / "cifar10") == ["vit-mini-patch4-mae"]  # names follow the model
    default = train_classifier.Classification.output_path(parse(train_classifier))
    assert default == "vit-t-classifier-from_scratch.pth"  # the original's names for ViT-T/2


def test_the_confusion_figure_has_counts_and_class_names(tmp_path):
    confusion = torch.tensor([[8.0, 2.0, 0.0], [1.0, 9.0, 0.0], [0.0, 3.0, 7.0]])
    image = confusion_image(confusion, ["airplane", "automobile", "bird"])
    assert image.shape[0] == 3 and min(image.shape[1:]) > 3 * 30  # far larger than one pixel per cell
    assert not torch.equal(image, confusion_image(confusion, ["a", "b", "c"]))  # the names are drawn
    table = confusion_table(confusion, ["airplane", "automobile", "bird"]).splitlines()
    assert table[3] == "| automobile | 1 | 9 | 0 |"


def test_the_reconstruction_images_come_from_every_class_of_a_sorted_tree():
    labels = torch.arange(10).repeat_interleave(5)  # an ImageFolder tree: sorted by class
    data = ImageData(torch.zeros(50, 3, 4, 4), labels, torch.arange(50).view(50, 1, 1, 1).expand(50, 3, 4, 4),
                     labels, CLASSES)
    chosen = spread_test_images(data, 16)[:, 0, 0, 0]
    assert labels[chosen].tolist() == list(range(10)) + list(range(6))


def test_mix_prob_zero_leaves_targets_one_hot():
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    np.random.seed(0)
    mixed, targets = ClassificationLoss(10, mixup=0.8, cutmix=1.0, mix_prob=0).mixup(images.clone(), labels)
    assert torch.equal(mixed, images) and torch.equal(targets, torch.nn.functional.one_hot(labels, 10).float())
    half = ClassificationLoss(10, mixup=0.8, mix_prob=0.5).mixup
    assert (half.mix_prob, half.switch_prob) == (0.5, 0.5)


def test_flip_tta_on_mirror_symmetric_images_equals_plain_evaluation():
    torch.manual_seed(0)
    model = build_classifier(dict(image_size=8, patch_size=2, emb_dim=16, encoder_layer=2, encoder_head=2,
                                  in_chans=3, pos_embed="learned", num_classes=10, global_pool=False,
                                  linear_probe=False))
    half = torch.randint(0, 256, (40, 3, 8, 4), dtype=torch.uint8)
    symmetric = torch.cat([half, half.flip(-1)], dim=-1)
    loader = DeviceLoader(symmetric, torch.arange(40) % 10, 16, device=torch.device("cpu"), train=False)
    plain, tta = evaluate(model, loader, CPU, 10), evaluate(model, loader, CPU, 10, "flip")
    assert tta["acc_flip"] == plain["acc"] == tta["acc"]
    images, labels = torch.cat([half, half], dim=-1), torch.arange(40) % 10  # not mirror images of themselves
    tta = evaluate(model, DeviceLoader(images, labels, 16, device=torch.device("cpu"), train=False), CPU, 10, "flip")
    x = images.float() / 127.5 - 1
    with torch.no_grad():
        expected = ((model(x) + model(x.flip(-1))).argmax(1) == labels).float().mean().item()
    assert tta["acc_flip"] == pytest.approx(expected)


def readme_recipe_lines():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return [shlex.split(line.strip()) for line in f if re.match(r"\s+python \S+ -c configs/", line)]


def test_the_readmes_recipes_run_as_pasted(tmp_path, monkeypatch, capsys):
    """Every `-c configs/...` command of the README, in its order, with a tiny model and one epoch on tiny data."""
    lines = readme_recipe_lines()
    assert len(lines) >= 7
    data = write_cifar_batches(str(tmp_path / "data"), per_batch=4, test=10)
    monkeypatch.chdir(tmp_path)
    scripts = {"mae_pretrain.py": mae_pretrain, "moco_pretrain.py": moco_pretrain,
               "train_classifier.py": train_classifier}
    tiny_models = {mae_pretrain: [*TINY_MAE, "--knn_every", 0], train_classifier: TINY_MODEL,
                   moco_pretrain: [*TINY_MODEL, "--moco_k", 32, "--knn_every", 0, "--embedding_images", 0]}
    for argv in lines:
        script = scripts[argv[1]]
        argv = argv[2:]
        argv[argv.index("--data_dir") + 1] = data
        argv[argv.index("-c") + 1] = os.path.join(ROOT, argv[argv.index("-c") + 1])  # the recipe, from here
        tiny = ["-bs", 16, "--max_device_batch_size", 8, "--total_epoch", 1, "--warmup_epoch", 0, "--device", "cpu"]
        args = parse(script, *argv, *tiny, *tiny_models[script])
        script.main(args)
        assert os.path.isfile(args.output_model_path if script is train_classifier else args.model_path)
        if script is mae_pretrain:  # it ends by naming its checkpoint and the command that fine-tunes it
            assert capsys.readouterr().out.splitlines()[-1] == (
                f"pretrained {args.model_path}; fine-tune it with: python {os.path.join(ROOT, 'train_classifier.py')} "
                f"--pretrained_model_path {args.model_path}")
    assert {"vit-mini-patch4-mae.pth", "vit-mini-patch4-moco.pth", "vit-t-mae-250.pth",
            "vit-t-ft-1000.pth"} <= set(os.listdir(tmp_path))
