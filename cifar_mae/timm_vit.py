"""Any timm VisionTransformer as the MAE encoder (--model timm:NAME): its parts, its sizes, and a one-line refusal
of the variants that cannot serve."""
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

TIMM_KWARGS = dict(image_size="img_size", patch_size="patch_size", emb_dim="embed_dim", encoder_layer="depth",
                   encoder_head="num_heads")  # our size names -> timm.create_model's


def timm_vit(name, sizes=None, in_chans=3, drop_path=0.0, device=None):
    """timm.create_model(name, pretrained=False, ...) headless, with token pooling: the parts of an MAE encoder.
    sizes: our size names (TIMM_KWARGS) that override timm's, None for timm's own. A variant this cannot serve is
    a ValueError naming what it lacks."""
    kwargs = {TIMM_KWARGS[k]: v for k, v in (sizes or {}).items() if v is not None}
    try:
        with torch.device("meta"):  # a look at the architecture first, which allocates nothing
            vit = timm.create_model(name, pretrained=False, num_classes=0)
            if not isinstance(vit, VisionTransformer):
                raise ValueError(f"it is a {type(vit).__name__}, not a VisionTransformer")
            vit = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"timm:{name} cannot be the MAE encoder: {e}") from None
    lacks = [what for what, bad in [
        ("has no class token", vit.cls_token is None), ("has register tokens", vit.num_reg_tokens),
        ("has no position for the class token (no_embed_class)", vit.no_embed_class or vit.pos_embed is None),
        ("takes a dynamic image size", vit.dynamic_img_size),
        ("has blocks without timm's Attention", not hasattr(getattr(vit.blocks[0], "attn", None), "num_heads"))]
        if bad]
    if lacks:
        raise ValueError(f"timm:{name} cannot be the MAE encoder: it {lacks[0]}")
    with torch.device(device or "cpu"):
        return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, global_pool="token",
                                 drop_path_rate=drop_path, **kwargs)


def timm_sizes(name, **sizes):
    """timm:NAME's sizes as MODELS gives them, where `sizes` (our names, None: timm's) do not override them; its
    decoder: 4 blocks with the encoder's heads."""
    vit = timm_vit(name, sizes, device="meta")
    heads = vit.blocks[0].attn.num_heads
    return dict(image_size=vit.patch_embed.img_size[0], patch_size=vit.patch_embed.patch_size[0],
                emb_dim=vit.embed_dim, encoder_layer=len(vit.blocks), encoder_head=heads, decoder_layer=4,
                decoder_head=heads)
