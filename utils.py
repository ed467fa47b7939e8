"""Using saved models from Python: rebuild a checkpoint's model, and turn image files into what models take.

    import utils
    mae = utils.load_model("vit-t-mae.pth")            # MAE_ViT, or ViT_Classifier for a classifier checkpoint
    resnet = utils.load_model("resnet18-cifar-moco.pth")   # a MoCo checkpoint's (query) encoder
    x = utils.normalize(utils.read_image("cat.jpg", 32)[None])   # float (1, 3, 32, 32) in [-1, 1]
"""
from cifar_mae.augment import denormalize, normalize
from cifar_mae.checkpoint import load_checkpoint
from cifar_mae.image_folders import read_image
from cifar_mae.knn import pooled_features
from model import MAE_ViT, build_classifier, build_encoder

__all__ = ["denormalize", "load_model", "normalize", "pooled_features", "read_image"]


def load_model(path):
    """The model a checkpoint of this project holds, with its weights, in eval mode (on the CPU); of a MoCo
    checkpoint, the encoder (image features: utils.pooled_features(encoder, x))."""
    ckpt = load_checkpoint(path)
    weights = ckpt["model"]
    if ckpt["kind"] == "moco_pretrain":
        model = build_encoder(ckpt["model_config"])
        weights = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
    elif ckpt["kind"] == "mae_pretrain":
        model = MAE_ViT(**ckpt["model_config"])
    else:
        model = build_classifier(ckpt["model_config"])
    model.load_state_dict(weights)
    return model.eval()
