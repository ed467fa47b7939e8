"""Our models for other code: a ViT as timm's VisionTransformer, a Vision-LSTM as the reference's VisionLSTM2
(NX-AI/vision-lstm): the state_dict and the call that loads it (the parameter names already follow theirs, so
this is a copy; a linear probe's BatchNorm is folded into the head)."""
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


def classifier_state(model, config):
    """The classifier's state_dict, a linear-probe BatchNorm folded into the head."""
    state, c = {k: v.detach().clone() for k, v in model.state_dict().items()}, ClassifierConfig.of(config)
    if c.linear_probe:  # head = BN(no affine) then Linear: fold (x - mean) / std into the linear layer
        bn = model.head[0]
        scale = (state.pop("head.0.running_var") + bn.eps).rsqrt()
        mean = state.pop("head.0.running_mean")
        state.pop("head.0.num_batches_tracked")
        weight, bias = state.pop("head.1.weight"), state.pop("head.1.bias")
        state["head.weight"] = weight * scale
        state["head.bias"] = bias - (weight * scale) @ mean
    return state


def classifier_export(model, config):
    """(state_dict, create_model kwargs) for timm's VisionTransformer; a linear-probe BatchNorm is folded."""
    c = ClassifierConfig.of(config)
    return classifier_state(model, config), timm_vit_kwargs(config, c.num_classes, "avg" if c.global_pool else "token")


def vil_kwargs(config):
    """VisionLSTM2(**kwargs) of the Vision-LSTM classifier a config describes."""
    c = ClassifierConfig.of(config)
    return dict(dim=c.emb_dim, input_shape=(c.in_chans, c.image_size, c.image_size), patch_size=c.patch_size,
                depth=c.encoder_layer, output_shape=(c.num_classes,), pooling=c.vil_pooling, conv_kind=c.vil_conv)


def write_vil_state(model, config, path):
    """Save a Vision-LSTM classifier for the reference's VisionLSTM2 and print the call that loads it."""
    save_atomic(classifier_state(model, config), path)
    call = ", ".join(f"{k}={v!r}" for k, v in vil_kwargs(config).items())
    print(f"wrote {path}; load it with NX-AI/vision-lstm's vision_lstm2.py:\n  model = VisionLSTM2({call})\n"
          f"  model.load_state_dict(torch.load({path!r}, weights_only=True))")


def write_timm_state(state, kwargs, path):
    """Save a state_dict for timm's VisionTransformer and print the create_model call that loads it."""
    save_atomic(state, path)
    call = ", ".join([repr(kwargs["model_name"])] + [f"{k}={v!r}" for k, v in kwargs.items() if k != "model_name"])
    print(f"wrote {path}; load it with:\n  model = timm.create_model({call})\n"
          f"  model.load_state_dict(torch.load({path!r}, weights_only=True))")


def write_classifier_exports(model, config, timm_path=None, vil_path=None):
    """--export_timm and --export_vil of a classifier, where given."""
    if timm_path:
        write_timm_state(*classifier_export(model, config), timm_path)
    if vil_path:
        write_vil_state(model, config, vil_path)
