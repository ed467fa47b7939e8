"""Any timm VisionTransformer as the MAE encoder (--model timm:NAME), and a plain timm state_dict to fine-tune."""
import json
import os
from types import SimpleNamespace

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed

import mae_pretrain
import train_classifier
from cifar_mae.settings import resolve_model
from cifar_mae.pretrained import read_pretrained, timm_state_dict
from cifar_mae.timm_export import classifier_export
from model import build_classifier

# timm's ViT-Tiny, made tiny with the size flags: 8x8 images of 4x4 patches, 2 blocks 16 wide
TIMM = ["--model", "timm:vit_tiny_patch16_224", "--image_size", 8, "--patch_size", 4, "--emb_dim", 16,
        "--encoder_layer", 2, "--encoder_head", 2]
COMMON = ["-bs", 8, "--warmup_epoch", 0, "--device", "cpu"]


def main(script, *argv):
    return script.main(script.get_args_parser().parse_args(list(map(str, [*COMMON, *argv]))))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_timm_encoder_pretrains_resumes_bit_exactly_and_fine_tunes(tmp_path, cifar_dir, capsys):
    pretrain = [*TIMM, "--data_dir", cifar_dir, "--total_epoch", 2, "--decoder_layer", 1, "--knn_every", 1]
    main(mae_pretrain, *pretrain, "--model_path", tmp_path / "full.pth", "--log_dir", tmp_path / "l1")
    main(mae_pretrain, *pretrain, "--model_path", tmp_path / "part.pth", "--log_dir", tmp_path / "l2",
         "--stop_after_epoch", 1)
    main(mae_pretrain, "--resume", tmp_path / "part.pth", "--data_dir", cifar_dir)
    full, part = load(tmp_path / "full.pth"), load(tmp_path / "part.pth")
    assert part["epoch"] == 2 and full["model_config"]["timm_model"] == "vit_tiny_patch16_224"
    assert_same(full["model"], part["model"])
    assert_same(full["optimizer"]["state"][0], part["optimizer"]["state"][0])
    # the encoder holds exactly the weights of timm's model built with those sizes
    vit = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                            num_classes=0)
    encoder = {k[len("encoder."):] for k in full["model"] if k.startswith("encoder.")}
    assert encoder == set(vit.state_dict())
    # fine-tuned, and as a linear probe whose encoder stays as pretrained
    finetune = ["--data_dir", cifar_dir, "--pretrained_model_path", tmp_path / "full.pth", "--total_epoch", 1]
    main(train_classifier, *finetune, "--output_model_path", tmp_path / "ft.pth",
         "--log_dir", tmp_path / "l3", "--export_timm", tmp_path / "timm.pth")
    main(train_classifier, *finetune, "--linear_probe", "--output_model_path", tmp_path / "lp.pth",
         "--log_dir", tmp_path / "l4")
    probe = load(tmp_path / "lp.pth")["model"]
    for key in encoder:
        assert torch.equal(probe[key], full["model"]["encoder." + key]), key
    # the kNN monitor ran each epoch on the timm encoder; --eval_only recomputes the last value from the weights
    with open(tmp_path / "l1" / "metrics.jsonl") as f:
        knn = [json.loads(line)["knn_acc"] for line in f if '"final"' not in line]
    assert len(knn) == 2 and main(mae_pretrain, "--eval_only", tmp_path / "full.pth")["knn_acc"] == knn[1]
    assert ", kNN " in capsys.readouterr().out
    # the export: the printed create_model call loads it strictly and gives our classifier's logits
    best = load(tmp_path / "ft.pth")
    assert best["model_config"]["timm_model"] == "vit_tiny_patch16_224"
    ours = build_classifier(best["model_config"]).eval()
    ours.load_state_dict(best["model"])
    _, kwargs = classifier_export(ours, best["model_config"])
    reference = timm.create_model(**kwargs).eval()
    reference.load_state_dict(load(tmp_path / "timm.pth"), strict=True)
    images = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(reference(images), ours(images), rtol=1e-5, atol=0)


def test_a_plain_timm_state_dict_fine_tunes_resampled_to_the_model(tmp_path, cifar_dir, capsys):
    # a timm model trained at 16x16 with 8x8 patches (2x2 of them) and a 1000-class head
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2)
    torch.save(vit.state_dict(), tmp_path / "timm.pth")
    torch.save({"model": vit.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")  # official MAE's layout
    assert_same(timm_state_dict(load(tmp_path / "wrapped.pth")), vit.state_dict())
    flags = [*TIMM[:4], "--patch_size", 2, *TIMM[6:], "--pretrained_model_path", tmp_path / "timm.pth"]
    args = train_classifier.get_args_parser().parse_args(list(map(str, flags)))
    pretrained, _ = read_pretrained(args, train_classifier.get_args_parser())
    resolve_model(args)
    task = train_classifier.Classification(args, None, (pretrained, None))
    model, config = task.build_model(None, SimpleNamespace(classes="abcdefghij")), task.config
    state, timm_state = model.state_dict(), vit.state_dict()
    assert config["timm_model"] == "vit_tiny_patch16_224" and state["head.weight"].shape == (10, 16)
    for key in timm_state:
        if key.startswith(("blocks.", "norm.")) or key in ("cls_token", "patch_embed.proj.bias"):
            assert torch.equal(state[key], timm_state[key]), key
    torch.testing.assert_close(state["pos_embed"], resample_abs_pos_embed(timm_state["pos_embed"], [4, 4]))
    torch.testing.assert_close(state["patch_embed.proj.weight"],
                               resample_patch_embed(timm_state["patch_embed.proj.weight"], [2, 2]))
    result = main(train_classifier, *flags, "--data_dir", cifar_dir, "--total_epoch", 1,
                  "--output_model_path", tmp_path / "c.pth", "--log_dir", tmp_path / "logs")
    assert result["best_epoch"] == 1 and os.path.isfile(tmp_path / "c.pth")
    assert (f"encoder from {tmp_path / 'timm.pth'}: a timm VisionTransformer state_dict (resampled: position "
            "embedding from 4 to 16 patches; patch projection from 8 to 2 pixels a side)") in capsys.readouterr().out


def test_a_state_dict_of_another_size_is_refused_in_one_line(tmp_path, cifar_dir, capsys):
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=32, depth=2,
                                 num_heads=2).state_dict(), tmp_path / "timm.pth")
    with pytest.raises(SystemExit) as exit_info:
        main(train_classifier, *TIMM, "--pretrained_model_path", tmp_path / "timm.pth",
             "--data_dir", cifar_dir, "--output_model_path", tmp_path / "c.pth", "--log_dir", tmp_path / "logs")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err == [
        f"error: --pretrained_model_path {tmp_path / 'timm.pth'} does not fit the model (size mismatch for "
        "cls_token: copying a param with shape torch.Size([1, 1, 32]) from checkpoint, the shape in current model "
        "is torch.Size([1, 1, 16]).): pass the --model and size flags it was trained with"]
    assert not os.path.exists(tmp_path / "c.pth")


@pytest.mark.parametrize("name,what", [("vit_base_patch16_siglip_224", "it has no class token"),
                                       ("vit_small_patch14_reg4_dinov2", "it has register tokens"),
                                       ("deit3_small_patch16_224", "it has no position for the class token "
                                                                   "(no_embed_class)"),
                                       ("resnet18", "it is a ResNet, not a VisionTransformer"),
                                       ("vit_nonesuch", "Unknown model (vit_nonesuch)")])
def test_a_timm_model_that_cannot_be_the_encoder_is_refused_in_one_line(tmp_path, capsys, name, what):
    with pytest.raises(SystemExit) as exit_info:
        main(mae_pretrain, "--model", f"timm:{name}", "--model_path", tmp_path / "m.pth")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err == [f"error: --model timm:{name} cannot be the MAE encoder: {what}"]
    assert not os.path.exists(tmp_path / "m.pth")


def test_weights_of_neither_kind_are_refused_in_one_line(tmp_path, capsys):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(SystemExit) as exit_info:
        main(train_classifier, "--pretrained_model_path", tmp_path / "other.pth")
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"error: --pretrained_model_path {tmp_path / 'other.pth'} is neither a checkpoint of this project nor a "
        "timm VisionTransformer state_dict (with cls_token, pos_embed, patch_embed.proj.weight)"]
