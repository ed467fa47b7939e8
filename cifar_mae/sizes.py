"""The named model sizes (--model NAME), as timm names its ViTs, and the file names their checkpoints get."""

# a size flag given overrides one value of the named size
MODELS = {
    "vit_tiny_patch2": dict(image_size=32, patch_size=2, emb_dim=192, encoder_layer=12, encoder_head=3,
                            decoder_layer=4, decoder_head=3),  # the original repository's ViT-T/2
    "vit_mini_patch4": dict(image_size=32, patch_size=4, emb_dim=64, encoder_layer=4, encoder_head=2,
                            decoder_layer=2, decoder_head=2),  # the CPU recipe's
    "vit_small_patch4": dict(image_size=32, patch_size=4, emb_dim=384, encoder_layer=12, encoder_head=6,
                             decoder_layer=4, decoder_head=6),
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
