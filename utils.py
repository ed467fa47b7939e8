"""Using saved models from Python: rebuild a checkpoint's model, and turn image files into what models take.

    import utils
    mae = utils.load_model("vit-t-mae.pth")            # MAE_ViT, or ViT_Classifier for a classifier checkpoint
    x = utils.normalize(utils.read_image("cat.jpg", 32)[None])   # float (1, 3, 32, 32) in [-1, 1]
"""
from cifar_mae.augment import denormalize, normalize
from cifar_mae.checkpoint import load_checkpoint
from cifar_mae.image_folders import read_image
from model import MAE_ViT, build_classifier

__all__ = ["denormalize", "load_model", "normalize", "read_image"]


def load_model(path):
    """The model a checkpoint of this project holds, with its weights, in eval mode (on the CPU)."""
    ckpt = load_checkpoint(path)
    model = MAE_ViT(**ckpt["model_config"]) if ckpt["kind"] == "mae_pretrain" else \
        build_classifier(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model.eval()
