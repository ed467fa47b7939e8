"""What rebuilds a model: its configuration, saved in every checkpoint as a plain dict (model_config, as nanoGPT
saves GPTConfig), the named sizes (--model NAME, as timm names its ViTs) and the file names their checkpoints get."""
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class EncoderConfig:
    """The encoder: a ViT (its sizes, input channels, position embedding, and the timm model it comes from; None:
    ours), or with `resnet` timm's ResNet of that name with the CIFAR stem (image size and channels only)."""
    image_size: int = 32
    patch_size: int = 2
    emb_dim: int = 192
    encoder_layer: int = 12
    encoder_head: int = 3
    in_chans: int = 3
    pos_embed: str = "learned"
    timm_model: str = None
    resnet: str = None

    @classmethod
    def of(cls, config):
        """This kind's fields from a config dict (a checkpoint's model_config); those missing take their
        defaults, other kinds' are left out."""
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})

    @classmethod
    def from_settings(cls, args, **values):
        """The configuration a run's settings describe (each field from the flag of its name; --model timm:NAME
        gives timm_model), with `values` on top. -> a plain dict, as checkpoints hold it."""
        found = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
        config = asdict(cls(**{**found, "timm_model": timm_name(args.model), **values}))
        named = MODELS.get(args.model, {})
        if named.get("resnet"):  # a ResNet has none of the ViT's sizes
            config = {k: v for k, v in config.items() if k not in VIT_ONLY | VIL_ONLY} | {"resnet": named["resnet"]}
        elif named.get("vil") and "vil" in config:
            config = {k: v for k, v in config.items() if k not in VIT_ONLY - VIL_SIZES} | {"vil": True}
        else:
            config = {k: v for k, v in config.items() if k not in VIL_ONLY}
        return config


@dataclass(frozen=True)
class MAEConfig(EncoderConfig):
    """An MAE: the encoder, the decoder (its width defaults to the encoder's), the mask ratio and the loss."""
    decoder_layer: int = 4
    decoder_head: int = 3
    decoder_emb_dim: int = None
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False


VIT_ONLY = {"patch_size", "emb_dim", "encoder_layer", "encoder_head", "pos_embed", "timm_model"}
VIL_SIZES = {"patch_size", "emb_dim", "encoder_layer"}  # the ViT's sizes a ViL has too (its heads are fixed)
VIL_ONLY = {"vil", "vil_pooling", "vil_conv"}


@dataclass(frozen=True)
class MoCoConfig(EncoderConfig):
    """MoCo on the encoder: its version, projection (and v3's predictor) widths, queue, temperature, momentum,
    symmetric loss (v2), and the BatchNorm groups of a ResNet (bn_splits)."""
    moco_version: int = 2
    moco_dim: int = 128
    moco_mlp_dim: int = 2048
    moco_k: int = 4096
    moco_t: float = 0.1
    moco_m: float = 0.99
    symmetric: bool = False
    bn_splits: int = 8
    freeze_patch_embed: bool = False


@dataclass(frozen=True)
class ClassifierConfig(EncoderConfig):
    """A classifier on the encoder: classes, pooling (cls token or mean of patch tokens), linear probe or not;
    with `vil` the encoder is a Vision-LSTM (image and patch size, width, encoder_layer block pairs), with its
    pooling and convolution."""
    num_classes: int = 10
    global_pool: bool = False
    linear_probe: bool = False
    vil: bool = False
    vil_pooling: str = "bilateral_flatten"
    vil_conv: str = "2d"


# a size flag given overrides one value of the named size
MODELS = {
    "vit_tiny_patch2": dict(image_size=32, patch_size=2, emb_dim=192, encoder_layer=12, encoder_head=3,
                            decoder_layer=4, decoder_head=3),  # the original repository's ViT-T/2
    "vit_mini_patch4": dict(image_size=32, patch_size=4, emb_dim=64, encoder_layer=4, encoder_head=2,
                            decoder_layer=2, decoder_head=2),  # the CPU recipe's
    "vit_small_patch4": dict(image_size=32, patch_size=4, emb_dim=384, encoder_layer=12, encoder_head=6,
                             decoder_layer=4, decoder_head=6),
    "resnet18_cifar": dict(image_size=32, resnet="resnet18"),  # ResNet-18, 3x3 stride-1 stem, no max-pool
    # Vision-LSTM (NX-AI/vision-lstm's VisionLSTM2): encoder_layer block pairs of width emb_dim
    "vil_tiny": dict(image_size=224, patch_size=16, emb_dim=192, encoder_layer=12, vil=True),  # ViL-T, 6.4M
    "vil_small": dict(image_size=224, patch_size=16, emb_dim=384, encoder_layer=12, vil=True),
    "vil_cifar_patch4": dict(image_size=32, patch_size=4, emb_dim=192, encoder_layer=12, vil=True),  # the tutorial's
    "vil_cifar_patch2": dict(image_size=32, patch_size=2, emb_dim=192, encoder_layer=12, vil=True),
    "vil_mini_patch4": dict(image_size=32, patch_size=4, emb_dim=64, encoder_layer=4, vil=True),  # CPU, 0.26M
    "vit_tiny_patch8_96": dict(image_size=96, patch_size=8, emb_dim=192, encoder_layer=12, encoder_head=3,
                               decoder_layer=4, decoder_head=3),  # STL-10's 96 x 96 images: 144 patches
    # ViT-T/2 with smaller decoders, which move fewer bytes per step
    "vit_tiny_patch2_dec2": dict(image_size=32, patch_size=2, emb_dim=192, encoder_layer=12, encoder_head=3,
                                 decoder_layer=2, decoder_head=3),
    "vit_tiny_patch2_dec2x128": dict(image_size=32, patch_size=2, emb_dim=192, encoder_layer=12, encoder_head=3,
                                     decoder_layer=2, decoder_head=4, decoder_emb_dim=128),
}
DEFAULT_MODEL = "vit_tiny_patch2"


def output_stem(name):
    """The file-name stem of a model's checkpoints: vit-t for ViT-T/2, as the original repository named it."""
    return "vit-t" if name == DEFAULT_MODEL else name.replace(":", "-").replace("_", "-")


def timm_name(model):
    """timm:NAME's NAME, or None for our own model (--model)."""
    return model[len("timm:"):] if model.startswith("timm:") else None


def resnet_arch(model):
    """The timm ResNet a named size (--model) builds, or None."""
    return MODELS.get(model, {}).get("resnet")


def is_vil(model):
    """Whether a named size (--model) is a Vision-LSTM."""
    return MODELS.get(model, {}).get("vil", False)
