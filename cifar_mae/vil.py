"""Vision-LSTM (ViL; Alkin et al. 2024, NX-AI/vision-lstm's VisionLSTM2): mLSTM blocks over the patch sequence,
alternating direction, as a classifier. Parameter names and shapes follow the reference's module tree, so its
state_dicts load here and ours load there.

A block pair reads the patches row by row from the top left, then from the bottom right. Each block: pre-norm,
an up-projection into an mLSTM branch and a gate z; the branch goes through a depthwise convolution over the
patch grid (or a causal 1-D one) and SiLU, head-wise q and k projections of that, v of the branch before the
convolution, input and forget gates from (q, k, v), the mLSTM cell in its parallel stabilised form, a multi-head
norm, a learnable skip of the convolved branch, times SiLU(z), and the down-projection."""
import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from cifar_mae.heads import classifier_head, freeze_all_but_head


def mlstm_parallel(q, k, v, igate, fgate, eps=1e-6):
    """The mLSTM cell over whole sequences at once. q, k, v: (B, H, S, D); igate, fgate: gate pre-activations
    (B, H, S) -> h (B, H, S, D).

    Token t reads value s <= t with weight D[t, s] = exp(i_s + sum of log sigmoid(f_r) for r in s+1..t), each
    row scaled by exp(-m_t), m_t its largest log weight (no exp overflows); h_t = sum_s (q_t . k_s / sqrt(D))
    D[t, s] v_s / max(|that sum without v|, exp(-m_t))."""
    length = q.shape[-2]
    log_forget = torch.cumsum(F.logsigmoid(fgate.float()), dim=-1)                           # (B, H, S)
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    log_weight = log_forget[..., :, None] - log_forget[..., None, :] + igate.float()[..., None, :]
    log_weight = log_weight.masked_fill(~causal, float("-inf"))                              # (B, H, S, S)
    stabiliser = log_weight.amax(dim=-1, keepdim=True)
    # each (S, S) pass costs more than one over (S, D): the scale goes on q, the normaliser on the output
    scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1) * torch.exp(log_weight - stabiliser).to(q.dtype)
    normaliser = torch.maximum(scores.sum(dim=-1, keepdim=True).abs(), torch.exp(-stabiliser).to(q.dtype))
    return (scores @ v) / (normaliser + eps)


class ResidualLayerNorm(nn.Module):
    """LayerNorm whose weight is stored as its offset from 1 (zeros at the start), as the reference's."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], 1 + self.weight, self.bias, self.eps)


class MultiHeadNorm(ResidualLayerNorm):
    """(B, H, S, D) -> normalised over each head's D (a group norm of H groups), then (B, S, H * D)."""

    def forward(self, x):
        batch, heads, length, width = x.shape
        x = x.transpose(1, 2).reshape(batch * length, heads * width)
        return F.group_norm(x, heads, 1 + self.weight, self.bias, self.eps).view(batch, length, heads * width)


class HeadwiseLinear(nn.Module):
    """A block-diagonal linear layer: blocks of `block` features, each mapped by its own block x block matrix."""

    def __init__(self, dim, block):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim // block, block, block) * math.sqrt(2 / (5 * block)))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        # out[..., h, o] = sum_d x[..., h, d] weight[h, o, d], as one broadcast matmul (einsum was 12x slower)
        x = x.unflatten(-1, (self.weight.shape[0], 1, -1))
        return (x @ self.weight.transpose(1, 2)).flatten(-3) + self.bias


class GridConv(nn.Conv2d):
    """A depthwise 3x3 convolution over the patch grid of a (B, S, C) sequence read row by row."""

    def __init__(self, dim, grid):
        super().__init__(dim, dim, 3, padding=1, groups=dim)
        self.grid = grid

    def forward(self, x):
        x = x.transpose(1, 2).unflatten(-1, self.grid)
        return super().forward(x).flatten(2).transpose(1, 2)


class CausalConv(nn.Module):
    """A depthwise causal 1-D convolution (kernel 4) along the sequence: token t sees tokens t-3..t."""

    def __init__(self, dim, kernel=4):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel - 1, groups=dim)

    def forward(self, x):
        return self.conv(x.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2)


class MatrixLSTMCell(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.igate, self.fgate = nn.Linear(3 * dim, heads), nn.Linear(3 * dim, heads)
        self.outnorm = MultiHeadNorm(dim)

    def forward(self, q, k, v):
        gates = torch.cat([q, k, v], dim=-1)
        split = lambda x: x.unflatten(-1, (self.heads, -1)).transpose(1, 2)                   # (B, H, S, D)
        h = mlstm_parallel(split(q), split(k), split(v), self.igate(gates).transpose(1, 2),
                           self.fgate(gates).transpose(1, 2))
        return self.outnorm(h)


class ViLLayer(nn.Module):
    """The mLSTM layer of a block; reverse: read the sequence from its end (the bottom-right patch)."""

    def __init__(self, dim, grid, reverse, conv="2d", qkv_block=4):
        super().__init__()
        inner = 2 * dim
        self.reverse = reverse
        self.proj_up = nn.Linear(dim, 2 * inner)
        self.q_proj, self.k_proj, self.v_proj = (HeadwiseLinear(inner, qkv_block) for _ in range(3))
        self.conv = GridConv(inner, grid) if conv == "2d" else CausalConv(inner)
        self.mlstm_cell = MatrixLSTMCell(inner, qkv_block)
        self.learnable_skip = nn.Parameter(torch.ones(inner))
        self.proj_down = nn.Linear(inner, dim)

    def forward(self, x):
        if self.reverse:
            x = x.flip(1)
        branch, z = self.proj_up(x).chunk(2, dim=-1)
        convolved = F.silu(self.conv(branch))
        h = self.mlstm_cell(self.q_proj(convolved), self.k_proj(convolved), self.v_proj(branch))
        x = self.proj_down((h + self.learnable_skip * convolved) * F.silu(z))
        return x.flip(1) if self.reverse else x


class ViLBlock(nn.Module):
    def __init__(self, dim, grid, reverse, drop_path=0.0, conv="2d"):
        super().__init__()
        self.norm = ResidualLayerNorm(dim)
        self.layer = ViLLayer(dim, grid, reverse, conv)
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x):
        return x + self.drop_path(self.layer(self.norm(x)))


class ViLBlockPair(nn.Module):
    def __init__(self, dim, grid, drop_path=0.0, conv="2d"):
        super().__init__()
        self.rowwise_from_top_left = ViLBlock(dim, grid, False, drop_path, conv)
        self.rowwise_from_bot_right = ViLBlock(dim, grid, True, drop_path, conv)

    def forward(self, x):
        return self.rowwise_from_bot_right(self.rowwise_from_top_left(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_chans, dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class PosEmbed(nn.Module):
    def __init__(self, grid, dim):
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(1, *grid, dim))


class VisionLSTM(nn.Module):
    """A ViL classifier: patch embedding, `depth` block pairs, a final norm, pooling (bilateral_flatten: the
    first and the last token side by side; bilateral_avg: their mean), a linear head; linear_probe: everything
    but the head frozen, and a BatchNorm without affine parameters before it (as ViT_Classifier's)."""
    backbone_prefix = ""

    def __init__(self, image_size=32, patch_size=4, dim=192, depth=12, num_classes=10, in_chans=3,
                 pooling="bilateral_flatten", conv="2d", drop_path=0.0, linear_probe=False):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        grid = (image_size // patch_size,) * 2
        self.pooling, self.linear_probe, self.num_features = pooling, linear_probe, dim
        self.patch_embed = PatchEmbed(in_chans, dim, patch_size)
        self.pos_embed = PosEmbed(grid, dim)
        self.blocks = nn.Sequential(*(ViLBlockPair(dim, grid, drop_path, conv) for _ in range(depth)))
        self.norm = ResidualLayerNorm(dim, eps=1e-6)
        self.apply(init_weights)
        self.head = classifier_head(2 * dim if pooling == "bilateral_flatten" else dim, num_classes, linear_probe)
        if linear_probe:
            freeze_all_but_head(self)

    def train(self, mode=True):
        super().train(mode)
        if self.linear_probe:  # the frozen body stays in eval mode (no drop path)
            for name, module in self.named_children():
                if name != "head":
                    module.eval()
        return self

    def group_matcher(self, coarse=False):
        """Layer ids for timm's layer-wise lr decay: the embeddings are layer 0, block pair i is layer i + 1."""
        return dict(stem=r"^pos_embed|^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def forward_features(self, imgs):
        """imgs: (B, C, H, W) -> pooled features (B, 2D) or (B, D)."""
        x = self.norm(self.blocks(self.patch_embed(imgs) + self.pos_embed.embed.flatten(1, 2)))
        return self.forward_head(x, pre_logits=True)

    def forward_head(self, x, pre_logits=False):
        if x.ndim == 3:
            first, last = x[:, 0], x[:, -1]
            x = torch.cat([first, last], dim=1) if self.pooling == "bilateral_flatten" else (first + last) / 2
        return x if pre_logits else self.head(x)

    def forward(self, imgs):
        return self.head(self.forward_features(imgs))


def init_weights(module):
    """The reference's initialisation, in its effect: small normal projections (std sqrt(2 / 5 fan)), a
    smaller down-projection (2 / sqrt(dim)), zero input- and forget-gate weights with forget biases from 3 to 6
    (a long memory at the start), the patch projection as a linear layer, the position table trunc-normal 0.02."""
    if isinstance(module, ViLLayer):
        dim = module.proj_up.in_features
        small = math.sqrt(2 / (5 * dim))
        nn.init.normal_(module.proj_up.weight, std=small)
        nn.init.zeros_(module.proj_up.bias)
        nn.init.normal_(module.proj_down.weight, std=2 / math.sqrt(dim))
        nn.init.zeros_(module.proj_down.bias)
        for proj in (module.q_proj, module.k_proj, module.v_proj):
            nn.init.normal_(proj.weight, std=small)
    elif isinstance(module, MatrixLSTMCell):
        nn.init.zeros_(module.fgate.weight)
        with torch.no_grad():
            module.fgate.bias.copy_(torch.linspace(3.0, 6.0, module.heads))
        nn.init.zeros_(module.igate.weight)
        nn.init.normal_(module.igate.bias, std=0.1)
    elif isinstance(module, PatchEmbed):
        nn.init.xavier_uniform_(module.proj.weight.view(module.proj.out_channels, -1))
        nn.init.zeros_(module.proj.bias)
    elif isinstance(module, PosEmbed):
        trunc_normal_(module.embed, std=0.02)
