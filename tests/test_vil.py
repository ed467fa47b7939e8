"""The Vision-LSTM backbone (cifar_mae/vil.py): the mLSTM cell against its recurrent form, direction, causality,
the reference's state_dict layout, and training with train_classifier.py."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from cifar_mae.pretrained import resampled_vil_state
from cifar_mae.vil import ViLLayer, VisionLSTM, mlstm_parallel
from conftest import interrupt_at_step, write_cifar_batches
from test_scripts import assert_same_tensors, classify, load, metrics, one_and_two_processes, run_here

VIL = ["--model", "vil_mini_patch4", "--image_size", 8, "--emb_dim", 16, "--encoder_layer", 1]


def mlstm_recurrent(q, k, v, igate, fgate, eps=1e-6):
    """The xLSTM paper's mLSTM, one step at a time: C_t = f_t C_{t-1} + i_t v_t k_t^T, n_t = f_t n_{t-1} + i_t k_t,
    h_t = C_t q_t / max(|n_t . q_t|, 1), with k scaled by 1/sqrt(d); exponential input gate, sigmoid forget gate,
    both stabilised by the running maximum m_t = max(log f_t + m_{t-1}, i_t) (so the 1 becomes exp(-m_t))."""
    batch, heads, length, dim = q.shape
    q, k, v, igate, fgate = (x.double() for x in (q, k, v, igate, fgate))
    k = k / math.sqrt(dim)
    C = torch.zeros(batch, heads, dim, dim, dtype=torch.float64)
    n = torch.zeros(batch, heads, dim, dtype=torch.float64)
    m = torch.full((batch, heads), float("-inf"), dtype=torch.float64)
    out = []
    for t in range(length):
        log_f = F.logsigmoid(fgate[..., t])
        m_new = torch.maximum(log_f + m, igate[..., t])
        i = torch.exp(igate[..., t] - m_new)
        f = torch.exp(log_f + m - m_new)
        C = f[..., None, None] * C + i[..., None, None] * (v[..., t, :, None] * k[..., t, None, :])
        n = f[..., None] * n + i[..., None] * k[..., t, :]
        m = m_new
        numerator = (C @ q[..., t, :, None])[..., 0]
        denominator = torch.maximum((n * q[..., t, :]).sum(-1).abs(), torch.exp(-m))
        out.append(numerator / (denominator[..., None] + eps))
    return torch.stack(out, dim=2)


def gate_inputs(length, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, length, 8, generator=g) for _ in range(3))
    igate, fgate = (scale * torch.randn(2, 3, length, generator=g) for _ in range(2))
    return q, k, v, igate, fgate


@pytest.mark.parametrize("length,scale", [(5, 1.0), (256, 1.0), (64, 30.0)])
def test_the_parallel_mlstm_equals_its_recurrent_form(length, scale):
    """Short sequences and long ones (patch 2 on 32 x 32: 256 tokens), and gate pre-activations of +-30 (exp(30)
    would overflow a plain sum)."""
    inputs = gate_inputs(length, scale)
    expected = mlstm_recurrent(*inputs)
    torch.testing.assert_close(mlstm_parallel(*inputs).double(), expected, rtol=1e-4, atol=5e-5)  # fp32 sums
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls: about 3 significant digits
        half = mlstm_parallel(*inputs)
    assert torch.isfinite(half).all()
    assert (half.double() - expected).abs().max() < 0.05 * expected.abs().max()


def test_a_token_reads_nothing_that_comes_after_it():
    q, k, v, igate, fgate = gate_inputs(20, 2.0)
    h = mlstm_parallel(q, k, v, igate, fgate)
    later = [x.clone() for x in (q, k, v, igate, fgate)]
    for x in later:
        x[:, :, 12:] = torch.randn_like(x[:, :, 12:]) * 5
    changed = mlstm_parallel(*later)
    torch.testing.assert_close(changed[:, :, :12], h[:, :, :12], rtol=0, atol=0)
    assert not torch.allclose(changed[:, :, 12:], h[:, :, 12:])


@pytest.mark.parametrize("conv", ["2d", "causal1d"])
def test_a_backward_block_is_the_forward_block_on_the_reversed_sequence(conv):
    torch.manual_seed(0)
    forward, backward = ViLLayer(16, (4, 4), False, conv), ViLLayer(16, (4, 4), True, conv)
    backward.load_state_dict(forward.state_dict())
    x = torch.randn(2, 16, 16)
    torch.testing.assert_close(backward(x), forward(x.flip(1)).flip(1))
    assert not torch.allclose(backward(x), forward(x), atol=1e-4)


def reference_layout(dim, depth, patch, grid, classes, conv="2d"):
    """NX-AI/vision-lstm's VisionLSTM2 state_dict keys and shapes (its module tree: patch_embed.proj, pos_embed.embed,
    blocks.i.{rowwise_from_top_left, rowwise_from_bot_right}.{norm, layer.{proj_up, q/k/v_proj (LinearHeadwiseExpand
    of blocks of 4), conv, mlstm_cell.{igate, fgate, outnorm}, learnable_skip, proj_down}}, norm, head)."""
    inner = 2 * dim
    layout = {"patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
              "pos_embed.embed": (1, grid, grid, dim)}
    for i in range(depth):
        for side in ("rowwise_from_top_left", "rowwise_from_bot_right"):
            p = f"blocks.{i}.{side}."
            layout |= {p + "norm.weight": (dim,), p + "norm.bias": (dim,), p + "layer.learnable_skip": (inner,),
                       p + "layer.proj_up.weight": (2 * inner, dim), p + "layer.proj_up.bias": (2 * inner,),
                       p + "layer.proj_down.weight": (dim, inner), p + "layer.proj_down.bias": (dim,)}
            for proj in ("q_proj", "k_proj", "v_proj"):
                layout |= {p + f"layer.{proj}.weight": (inner // 4, 4, 4), p + f"layer.{proj}.bias": (inner,)}
            conv_key = "layer.conv." if conv == "2d" else "layer.conv.conv."
            layout |= {p + conv_key + "weight": (inner, 1, 3, 3) if conv == "2d" else (inner, 1, 4),
                       p + conv_key + "bias": (inner,)}
            for gate in ("igate", "fgate"):
                layout |= {p + f"layer.mlstm_cell.{gate}.weight": (4, 3 * inner),
                           p + f"layer.mlstm_cell.{gate}.bias": (4,)}
            layout |= {p + "layer.mlstm_cell.outnorm.weight": (inner,), p + "layer.mlstm_cell.outnorm.bias": (inner,)}
    return layout | {"norm.weight": (dim,), "norm.bias": (dim,), "head.weight": (classes, 2 * dim),
                     "head.bias": (classes,)}


@pytest.mark.parametrize("conv", ["2d", "causal1d"])
def test_the_state_dict_has_the_references_layout_and_loads_strictly(conv):
    model = VisionLSTM(32, 4, 16, 2, 10, conv=conv)
    layout = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert layout == reference_layout(16, 2, 4, 8, 10, conv)
    torch.manual_seed(1)
    state = {k: torch.randn(shape) for k, shape in reference_layout(16, 2, 4, 8, 10, conv).items()}
    model.load_state_dict(state, strict=True)
    assert_same_tensors(model.state_dict(), state)


def test_published_weights_are_resampled_as_timm_resamples():
    """A 224-pixel, patch-16 state_dict (14 x 14 patches) into a 32-pixel, patch-4 model (8 x 8)."""
    torch.manual_seed(2)
    published = {k: torch.randn(shape) for k, shape in reference_layout(16, 1, 16, 14, 1000).items()}
    published |= {"legacy_norm.weight": torch.ones(32), "legacy_norm.bias": torch.zeros(32)}
    model = VisionLSTM(32, 4, 16, 1, 10)
    state, done = resampled_vil_state(published, model)
    expected = resample_abs_pos_embed(published["pos_embed.embed"].reshape(1, 196, 16), new_size=[8, 8],
                                      old_size=[14, 14], num_prefix_tokens=0)
    torch.testing.assert_close(state["pos_embed.embed"], expected.reshape(1, 8, 8, 16), rtol=0, atol=0)
    assert state["patch_embed.proj.weight"].shape == (16, 3, 4, 4)
    assert not any(k.startswith(("head.", "legacy_norm.")) for k in state)
    assert done == ["position embedding from 14x14 to 8x8 patches", "patch projection from 16 to 4 pixels a side"]
    model.load_state_dict({**state, "head.weight": model.head.weight, "head.bias": model.head.bias}, strict=True)


def test_a_vil_trains_resumes_bit_identical_and_loads_its_export(tmp_path, cifar_dir, capsys, monkeypatch):
    flags = [*VIL, "--drop_path", 0.1, "--layer_decay", 0.8, "--ema", "--ema_decay", 0.9, "--mixup", 0.5]
    result, full, full_logs = classify(tmp_path, cifar_dir, *flags, "--export_vil", tmp_path / "vil.pth",
                                       name="full", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "VisionLSTM2(dim=16, input_shape=(3, 8, 8), patch_size=4, depth=1" in result.stdout
    interrupt_at_step(monkeypatch, 4)
    result, _, part_logs = classify(tmp_path, cifar_dir, *flags, name="part", capsys=capsys)
    monkeypatch.undo()
    assert result.returncode == 130, result.stderr
    result = run_here(capsys, "train_classifier.py", "--data_dir", cifar_dir, "--resume", tmp_path / "part-last.pth")
    assert result.returncode == 0, result.stderr
    a, b = load(tmp_path / "full-last.pth"), load(tmp_path / "part-last.pth")
    for key in ("model", "ema", "best_model"):
        assert_same_tensors(a[key], b[key], key)
    assert [line.get("val_acc") for line in metrics(part_logs)] == [line.get("val_acc") for line in metrics(full_logs)]
    exported = VisionLSTM(8, 4, 16, 1, 10)  # as the reference would: its layout, strictly
    exported.load_state_dict(load(tmp_path / "vil.pth"), strict=True)
    assert_same_tensors(exported.state_dict(), load(full)["model"])


BAD_INPUTS = {
    "head count of a ViL": (["--encoder_head", 4], "--encoder_head acts on a ViT"),
    "cls pooling of a ViL": (["--global_pool"], "--global_pool acts on a ViT"),
    "timm export of a ViL": (["--export_timm", "x.pth"], "--export_timm acts on a ViT"),
    "ViL flag on a ViT": (["--model", "vit_mini_patch4", "--vil_pooling", "bilateral_avg"],
                          "--vil_pooling acts on a Vision-LSTM"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_flags_that_do_not_apply_to_a_vil_end_with_one_line(case, tmp_path, capsys):
    flags, fragment = BAD_INPUTS[case]
    model = [] if "--model" in flags else ["--model", "vil_mini_patch4"]
    result = run_here(capsys, "train_classifier.py", *model, *flags, "--data_dir", tmp_path / "none")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and fragment in lines[0], lines


def test_mae_refuses_a_vil_in_one_line(tmp_path, capsys):
    result = run_here(capsys, "mae_pretrain.py", "--model", "vil_mini_patch4", "--data_dir", tmp_path / "none")
    assert result.returncode == 2 and "whose 2-D convolution needs the whole patch grid" in result.stderr


def test_a_vil_classifier_fine_tunes_from_a_reference_state_dict(tmp_path, capsys):
    data = write_cifar_batches(str(tmp_path / "data"))
    torch.manual_seed(3)
    published = {k: torch.randn(shape) * 0.02 for k, shape in reference_layout(16, 1, 16, 14, 1000).items()}
    torch.save({"state_dict": published}, tmp_path / "vil2.th")  # as the reference's files hold it
    result, _, _ = classify(tmp_path, data, *VIL, "--pretrained_model_path", tmp_path / "vil2.th", "--linear_probe",
                            "--total_epoch", 1, "--warmup_epoch", 0, capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "a Vision-LSTM (VisionLSTM2) state_dict (resampled: position embedding from 14x14 to 2x2" in result.stdout
    trained = load(tmp_path / "cls-last.pth")["model"]
    assert torch.equal(trained["blocks.0.rowwise_from_bot_right.layer.proj_up.weight"],
                       published["blocks.0.rowwise_from_bot_right.layer.proj_up.weight"])


def test_two_processes_train_a_vil_as_one_does(tmp_path, cifar_dir):
    """The same global batch of 16 in micro-batches of 4: two per process under torchrun, four in one process."""
    flags = ["--data_dir", cifar_dir, *VIL, "--batch_size", 16, "--max_device_batch_size", 4, "--total_epoch", 1,
             "--warmup_epoch", 0, "--crop_scale", 1, 1, "--no-flip", "--device", "cpu"]
    one_and_two_processes(tmp_path, "train_classifier.py", flags, "--output_model_path")
    a, b = load(tmp_path / "one-last.pth"), load(tmp_path / "two-last.pth")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5, msg=key)
    assert b["world_size"] == 2
    assert metrics(tmp_path / "logs-one")[0]["val_acc"] == metrics(tmp_path / "logs-two")[0]["val_acc"]
