"""Masked Autoencoder (MAE) Vision Transformer for small images, and a classifier on its encoder.

Shapes use B = batch, C = channels, H = W = image_size, p = patch_size,
T = (H / p) ** 2 patches, V = visible patches, D = encoder width, Dd = decoder width.
Patches are flattened channel-major, (c p1 p2), as in the repository this project descends from.
"""
from dataclasses import asdict
from functools import partial

import torch
import torch.nn as nn
from einops import rearrange
from timm.layers import PatchEmbed, trunc_normal_
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block

from cifar_mae.model_config import DEFAULT_MODEL, MODELS, ClassifierConfig, EncoderConfig, MAEConfig
from cifar_mae.heads import classifier_head, freeze_all_but_head
from cifar_mae.resnet import ResNetClassifier, cifar_resnet
from cifar_mae.timm_vit import TIMM_KWARGS, timm_sizes, timm_vit
from cifar_mae.vil import VisionLSTM

LayerNorm = partial(nn.LayerNorm, eps=1e-6)  # the eps of timm's VisionTransformer, so exports match exactly


def num_visible_patches(num_patches, mask_ratio):
    """How many patches stay visible: int(T * (1 - mask_ratio))."""
    return int(num_patches * (1 - mask_ratio))


def check_config(image_size, patch_size, emb_dim, heads, mask_ratio=0.0):
    """Raise ValueError with a plain message for a configuration that cannot work."""
    if image_size <= 0 or patch_size <= 0 or image_size % patch_size != 0:
        raise ValueError(f"image_size ({image_size}) must be a positive multiple of patch_size ({patch_size})")
    for name, heads_n in heads.items():
        if heads_n <= 0 or emb_dim[name] % heads_n != 0:
            raise ValueError(f"{name} width ({emb_dim[name]}) must be divisible by its head count ({heads_n})")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio ({mask_ratio}) must lie in [0, 1)")
    if num_visible_patches((image_size // patch_size) ** 2, mask_ratio) < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {(image_size // patch_size) ** 2}")


def patchify(imgs, patch_size):
    """imgs: (B, C, H, W) -> patches: (B, T, C*p*p)."""
    return rearrange(imgs, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=patch_size, p2=patch_size)


def unpatchify(patches, patch_size, channels):
    """patches: (B, T, C*p*p) -> imgs: (B, C, H, W)."""
    side = int(patches.shape[1] ** 0.5)
    return rearrange(patches, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=side, w=side, c=channels,
                     p1=patch_size, p2=patch_size)


def make_pos_embed(num_patches, dim, kind):
    """Position embedding (1, 1 + T, D) whose first row belongs to the cls token (zeros for sin-cos)."""
    if kind == "learned":
        pos = nn.Parameter(torch.zeros(1, 1 + num_patches, dim))
        trunc_normal_(pos, std=0.02)
        return pos
    if kind == "sincos":
        side = int(num_patches ** 0.5)
        table = build_sincos2d_pos_embed([side, side], dim=dim)  # (T, D)
        table = torch.cat([torch.zeros(1, dim), table], dim=0)[None]
        return nn.Parameter(table, requires_grad=False)
    raise ValueError(f"pos_embed must be 'learned' or 'sincos', not {kind!r}")


def init_weights(module):
    """Official MAE initialisation: xavier-uniform linears, unit layer norms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def make_blocks(dim, heads, depth, drop_path=0.0):
    """`depth` timm Blocks, applied in turn, with stochastic depth rising linearly to `drop_path`."""
    rates = torch.linspace(0, drop_path, depth, device="cpu").tolist() if depth else []  # cpu: also under meta
    return nn.Sequential(*[
        Block(dim=dim, num_heads=heads, mlp_ratio=4.0, qkv_bias=True, drop_path=rate, norm_layer=LayerNorm)
        for rate in rates])


def embed(patch_embed, pos_embed, imgs):
    """imgs: (B, C, H, W) -> patch tokens with position (B, T, D), in the patch projection's dtype: under autocast
    the residual stream stays bf16 rather than being promoted to fp32 by the fp32 position embedding."""
    tokens = patch_embed(imgs)
    return tokens + pos_embed[:, 1:].to(tokens.dtype)


def pre_norm(norm_pre, tokens):
    """A timm ViT's norm before the blocks, where it has one."""
    return tokens if norm_pre is None else norm_pre(tokens)


def prepend_cls(cls_token, pos_embed, tokens):
    """tokens: (B, N, D) -> (B, 1 + N, D) with the cls token (and its position) in front, in the tokens' dtype."""
    cls = (cls_token + pos_embed[:, :1]).to(tokens.dtype).expand(tokens.shape[0], -1, -1)
    return torch.cat([cls, tokens], dim=1)


class PatchShuffle(nn.Module):
    """Per-sample random masking: keeps exactly int(T * (1 - ratio)) patches of each sample."""

    def __init__(self, ratio):
        super().__init__()
        self.ratio = ratio

    def forward(self, patches, ratio=None):
        """patches: (B, T, D) -> visible (B, V, D), ids_shuffle (B, T), ids_restore (B, T).

        ids_shuffle[b] lists the patch indexes in shuffled order (the first V are kept);
        ids_restore is its inverse permutation, so gather(shuffled, ids_restore) is the original order.
        """
        ratio = self.ratio if ratio is None else ratio
        batch, num_patches, dim = patches.shape
        num_visible = num_visible_patches(num_patches, ratio)
        noise = torch.rand(batch, num_patches, device=patches.device)  # follows torch's RNG
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        ids_keep = ids_shuffle[:, :num_visible]
        visible = patches.gather(1, ids_keep[..., None].expand(-1, -1, dim))
        return visible, ids_shuffle, ids_restore


class MAE_Encoder(nn.Module):
    """ViT encoder that sees only the visible patches (plus the cls token). With timm_model (a timm
    VisionTransformer's name), its patch embedding, blocks and norms are timm's, built with these sizes."""

    def __init__(self, image_size=32, patch_size=2, emb_dim=192, num_layer=12, num_head=3, mask_ratio=0.75,
                 in_chans=3, pos_embed="learned", drop_path=0.0, timm_model=None):
        super().__init__()
        sizes = dict(image_size=image_size, patch_size=patch_size, emb_dim=emb_dim, encoder_layer=num_layer,
                     encoder_head=num_head)
        vit = timm_vit(timm_model, sizes, in_chans, drop_path) if timm_model else None
        if vit is not None:
            image_size, patch_size = vit.patch_embed.img_size[0], vit.patch_embed.patch_size[0]
            emb_dim, num_head = vit.embed_dim, vit.blocks[0].attn.num_heads
        check_config(image_size, patch_size, {"encoder": emb_dim}, {"encoder": num_head}, mask_ratio)
        self.patch_size, self.in_chans, self.num_features = patch_size, in_chans, emb_dim
        self.patch_embed = vit.patch_embed if vit else PatchEmbed(img_size=image_size, patch_size=patch_size,
                                                                  in_chans=in_chans, embed_dim=emb_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, emb_dim))
        self.pos_embed = make_pos_embed(self.num_patches, emb_dim, pos_embed)
        self.shuffle = PatchShuffle(mask_ratio)
        # timm's CLIP-style ViTs normalise the tokens before the blocks; the others have no such norm
        self.norm_pre = None if vit is None or isinstance(vit.norm_pre, nn.Identity) else vit.norm_pre
        self.blocks = vit.blocks if vit else make_blocks(emb_dim, num_head, num_layer, drop_path)
        self.norm = vit.norm if vit else LayerNorm(emb_dim)
        self.apply(init_weights)
        # the patch projection is initialised like a linear layer (official MAE)
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(emb_dim, -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def embed(self, imgs):
        """imgs: (B, C, H, W) -> patch tokens with position (B, T, D)."""
        return embed(self.patch_embed, self.pos_embed, imgs)

    def prepend_cls(self, tokens):
        """tokens: (B, N, D) -> (B, 1 + N, D) with the cls token (and its position) in front."""
        return prepend_cls(self.cls_token, self.pos_embed, tokens)

    def forward(self, imgs, mask_ratio=None):
        """imgs: (B, C, H, W) -> features (B, 1 + V, D), ids_restore (B, T)."""
        visible, _, ids_restore = self.shuffle(self.embed(imgs), mask_ratio)
        x = pre_norm(self.norm_pre, self.prepend_cls(visible))
        x = self.blocks(x)
        return self.norm(x), ids_restore

    def forward_features(self, imgs):
        """imgs: (B, C, H, W) -> normalised features of all patches (B, 1 + T, D); no masking."""
        x = pre_norm(self.norm_pre, self.prepend_cls(self.embed(imgs)))
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, features, pre_logits=True):
        """forward_features' output -> the image's feature (B, D): the cls token (timm's convention)."""
        return features[:, 0]


class MAE_Decoder(nn.Module):
    """Lightweight decoder: fills masked positions with a mask token and predicts every patch's pixels."""

    def __init__(self, image_size=32, patch_size=2, emb_dim=192, num_layer=4, num_head=3, in_chans=3,
                 encoder_emb_dim=None, pos_embed="learned"):
        super().__init__()
        encoder_emb_dim = emb_dim if encoder_emb_dim is None else encoder_emb_dim
        check_config(image_size, patch_size, {"decoder": emb_dim}, {"decoder": num_head})
        num_patches = (image_size // patch_size) ** 2
        self.decoder_embed = nn.Linear(encoder_emb_dim, emb_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, emb_dim))
        self.pos_embed = make_pos_embed(num_patches, emb_dim, pos_embed)
        self.blocks = make_blocks(emb_dim, num_head, num_layer)
        self.norm = LayerNorm(emb_dim)
        self.head = nn.Linear(emb_dim, in_chans * patch_size ** 2)
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, features, ids_restore):
        """features: (B, 1 + V, D), ids_restore: (B, T) -> predicted patches (B, T, C*p*p)."""
        x = self.decoder_embed(features)
        batch, num_patches = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(batch, num_patches + 1 - x.shape[1], -1)  # the stream's dtype
        shuffled = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, T, Dd) in shuffled order
        patches = shuffled.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed.to(x.dtype)
        x = self.blocks(x)
        return self.head(self.norm(x)[:, 1:])


class MAE_ViT(nn.Module):
    """Masked autoencoder: encoder on visible patches, decoder reconstructs all of them."""

    def __init__(self, image_size=None, patch_size=None, emb_dim=None, encoder_layer=None, encoder_head=None,
                 decoder_layer=None, decoder_head=None, mask_ratio=0.75, in_chans=3, decoder_emb_dim=None,
                 pos_embed="learned", norm_pix_loss=False, timm_model=None, resnet=None):
        """Sizes not given (None) are DEFAULT_MODEL's, or with timm_model (a timm VisionTransformer's name) timm's;
        the decoder's width defaults to the encoder's."""
        super().__init__()
        if resnet:
            raise ValueError(f"MAE hides patches from a ViT, and {resnet} is a ResNet: pretrain it with "
                             "moco_pretrain.py, or pick a ViT (--model)")
        given = dict(image_size=image_size, patch_size=patch_size, emb_dim=emb_dim, encoder_layer=encoder_layer,
                     encoder_head=encoder_head, decoder_layer=decoder_layer, decoder_head=decoder_head)
        sizes = timm_sizes(timm_model, **{k: v for k, v in given.items() if k in TIMM_KWARGS}) if timm_model \
            else MODELS[DEFAULT_MODEL]
        image_size, patch_size, emb_dim, encoder_layer, encoder_head, decoder_layer, decoder_head = (
            sizes[k] if v is None else v for k, v in given.items())
        decoder_emb_dim = emb_dim if decoder_emb_dim is None else decoder_emb_dim
        check_config(image_size, patch_size, {"encoder": emb_dim, "decoder": decoder_emb_dim},
                     {"encoder": encoder_head, "decoder": decoder_head}, mask_ratio)
        num_patches = (image_size // patch_size) ** 2
        if num_visible_patches(num_patches, mask_ratio) == num_patches:  # loss() would divide 0 by 0
            raise ValueError(f"mask_ratio {mask_ratio} masks no patch out of {num_patches}, and the MAE loss is "
                             "taken over masked patches only")
        self.config = asdict(MAEConfig(  # everything needed to rebuild this model, saved in every checkpoint
            image_size=image_size, patch_size=patch_size, emb_dim=emb_dim, encoder_layer=encoder_layer,
            encoder_head=encoder_head, in_chans=in_chans, pos_embed=pos_embed, timm_model=timm_model,
            decoder_layer=decoder_layer, decoder_head=decoder_head, decoder_emb_dim=decoder_emb_dim,
            mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss))
        self.patch_size, self.in_chans, self.norm_pix_loss = patch_size, in_chans, norm_pix_loss
        self.encoder = MAE_Encoder(image_size, patch_size, emb_dim, encoder_layer, encoder_head, mask_ratio,
                                   in_chans=in_chans, pos_embed=pos_embed, timm_model=timm_model)
        self.decoder = MAE_Decoder(image_size, patch_size, decoder_emb_dim, decoder_layer, decoder_head,
                                   in_chans=in_chans, encoder_emb_dim=emb_dim, pos_embed=pos_embed)

    def forward(self, imgs, mask_ratio=None):
        """imgs: (B, C, H, W) -> predicted_img (B, C, H, W), mask (B, C, H, W) with 1 on masked pixels."""
        features, ids_restore = self.encoder(imgs, mask_ratio)
        pred = self.decoder(features, ids_restore)
        num_visible = features.shape[1] - 1
        # a patch is masked when its place in the shuffled order is past the visible ones
        mask = (ids_restore >= num_visible).to(pred.dtype)  # (B, T)
        mask = mask[..., None].expand(-1, -1, pred.shape[-1])
        return unpatchify(pred, self.patch_size, self.in_chans), unpatchify(mask, self.patch_size, self.in_chans)

    def target_patches(self, imgs):
        """imgs: (B, C, H, W) -> regression targets (B, T, C*p*p), normalised per patch with norm_pix_loss."""
        target = patchify(imgs, self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def loss(self, imgs, predicted_img, mask):
        """Mean squared error over masked pixels only: exact for any mask ratio. -> scalar."""
        pred = patchify(predicted_img, self.patch_size).float()
        target = self.target_patches(imgs.float())
        mask = patchify(mask, self.patch_size)[..., 0].float()  # (B, T), 1 = masked
        per_patch = (pred - target).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def reconstruct(self, imgs, predicted_img, mask):
        """Reconstruction in image space with the visible patches pasted back. -> (B, C, H, W)."""
        pred = patchify(predicted_img.float(), self.patch_size)
        if self.norm_pix_loss:  # undo the per-patch normalisation with each patch's own statistics
            target = patchify(imgs.float(), self.patch_size)
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        pred = unpatchify(pred, self.patch_size, self.in_chans)
        return pred * mask + imgs * (1 - mask)


class ViT_Classifier(nn.Module):
    """Classifier on an MAE encoder: all patches, no masking; cls token or mean-pooled patch tokens.

    Parameter names follow timm's VisionTransformer (cls_token, pos_embed, patch_embed, blocks, norm or
    fc_norm, head), so exporting to timm is a rename-free copy.
    """
    backbone_prefix = ""  # the encoder's weights are at the top level

    def __init__(self, encoder: MAE_Encoder, num_classes=10, global_pool=False, linear_probe=False):
        super().__init__()
        self.global_pool, self.linear_probe = global_pool, linear_probe
        self.patch_embed = encoder.patch_embed
        self.cls_token = encoder.cls_token
        self.pos_embed = encoder.pos_embed
        self.norm_pre = encoder.norm_pre
        self.blocks = encoder.blocks
        emb_dim = self.cls_token.shape[-1]
        if global_pool:  # official MAE: mean of patch tokens, then a new norm; the encoder's norm is unused
            self.fc_norm = LayerNorm(emb_dim)
        else:
            self.norm = encoder.norm
        self.head = classifier_head(emb_dim, num_classes, linear_probe)
        if linear_probe:
            freeze_all_but_head(self)

    def backbone_modules(self):
        """The modules that hold the encoder's weights."""
        modules = [self.patch_embed, self.norm_pre, self.blocks] + ([] if self.global_pool else [self.norm])
        return [module for module in modules if module is not None]

    def train(self, mode=True):
        super().train(mode)
        if self.linear_probe:  # a frozen encoder stays in eval mode (no drop path), so nothing in it changes
            for module in self.backbone_modules():
                module.eval()
        return self

    def group_matcher(self, coarse=False):
        """Layer ids for timm's layer-wise lr decay: embeddings are layer 0, block i is layer i + 1."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed|^norm_pre",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def forward_features(self, imgs):
        """imgs: (B, C, H, W) -> pooled features (B, D)."""
        x = prepend_cls(self.cls_token, self.pos_embed, embed(self.patch_embed, self.pos_embed, imgs))
        x = pre_norm(self.norm_pre, x)
        x = self.blocks(x)
        if self.global_pool:
            return self.fc_norm(x[:, 1:].mean(dim=1))
        return self.norm(x[:, 0])  # layer norm is per token: normalising the cls token alone is the same

    def forward(self, imgs):
        """imgs: (B, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.forward_features(imgs))


def build_encoder(config, drop_path=0.0):
    """The encoder a config dict (EncoderConfig's fields) describes, without masking: an MAE_Encoder, or the
    CIFAR ResNet. Both give image features as timm's models do (forward_features, forward_head, num_features)."""
    c = EncoderConfig.of(config)
    if c.resnet:
        return cifar_resnet(c.resnet, c.in_chans, drop_path)
    return MAE_Encoder(c.image_size, c.patch_size, c.emb_dim, c.encoder_layer, c.encoder_head, mask_ratio=0.0,
                       in_chans=c.in_chans, pos_embed=c.pos_embed, drop_path=drop_path, timm_model=c.timm_model)


def build_classifier(config, drop_path=0.0):
    """A ViT_Classifier (or ResNetClassifier, or VisionLSTM) from a plain config dict (ClassifierConfig's fields),
    as checkpoints save it."""
    c = ClassifierConfig.of(config)
    if c.vil:
        return VisionLSTM(c.image_size, c.patch_size, c.emb_dim, c.encoder_layer, c.num_classes, c.in_chans,
                          c.vil_pooling, c.vil_conv, drop_path, c.linear_probe)
    encoder = build_encoder(config, drop_path)
    if c.resnet:
        return ResNetClassifier(encoder, c.num_classes, linear_probe=c.linear_probe)
    return ViT_Classifier(encoder, c.num_classes, global_pool=c.global_pool, linear_probe=c.linear_probe)
