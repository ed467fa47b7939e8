"""Our models as timm's VisionTransformer: the state_dict and the create_model call that loads it (the parameter
names already follow timm's, so this is a copy; a linear probe's BatchNorm is folded into the head)."""
from cifar_mae.atomic import save_atomic
from cifar_mae.model_config import ClassifierConfig, EncoderConfig


def timm_vit_kwargs(config, num_classes, global_pool):
    """timm.create_model(**kwargs) of the VisionTransformer that a model config describes: the timm model it was
    built from (--model timm:NAME), or timm's ViT-Tiny given our sizes."""
    c = EncoderConfig.of(config)
    return dict(model_name=c.timm_model or "vit_tiny_patch16_224", pretrained=False, img_size=c.image_size,
                patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.emb_dim, depth=c.encoder_layer,
                num_heads=c.encoder_head, num_classes=num_classes, global_pool=global_pool)


def encoder_export(encoder, config):
    """(state_dict, create_model kwargs) of a ViT encoder (its model's config) as timm's VisionTransformer without
    a head."""
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    return state, timm_vit_kwargs(config, 0, "token")


def classifier_export(model, config):
    """(state_dict, create_model kwargs) for timm's VisionTransformer; a linear-probe BatchNorm is folded."""
    state, c = {k: v.detach().clone() for k, v in model.state_dict().items()}, ClassifierConfig.of(config)
    if c.linear_probe:  # head = BN(no affine) then Linear: fold (x - mean) / std into the linear layer
        bn = model.head[0]
        scale = (state.pop("head.0.running_var") + bn.eps).rsqrt()
        mean = state.pop("head.0.running_mean")
        state.pop("head.0.num_batches_tracked")
        weight, bias = state.pop("head.1.weight"), state.pop("head.1.bias")
        state["head.weight"] = weight * scale
        state["head.bias"] = bias - (weight * scale) @ mean
    return state, timm_vit_kwargs(config, c.num_classes, "avg" if c.global_pool else "token")


def write_timm_state(state, kwargs, path):
    """Save a state_dict for timm's VisionTransformer and print the create_model call that loads it."""
    save_atomic(state, path)
    call = ", ".join([repr(kwargs["model_name"])] + [f"{k}={v!r}" for k, v in kwargs.items() if k != "model_name"])
    print(f"wrote {path}; load it with:\n  model = timm.create_model({call})\n"
          f"  model.load_state_dict(torch.load({path!r}, weights_only=True))")
