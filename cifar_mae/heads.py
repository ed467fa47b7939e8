"""The classifiers' head, the same on every backbone (official MAE's): a linear layer, trunc-normal std 2e-5 for
fine-tuning; for a linear probe, std 0.01 after a BatchNorm without affine parameters, every other weight frozen."""
from timm.layers import trunc_normal_
from torch import nn


def classifier_head(width, num_classes, linear_probe=False):
    head = nn.Linear(width, num_classes)
    trunc_normal_(head.weight, std=0.01 if linear_probe else 2e-5)
    nn.init.zeros_(head.bias)
    return nn.Sequential(nn.BatchNorm1d(width, affine=False, eps=1e-6), head) if linear_probe else head


def freeze_all_but_head(model):
    """A linear probe trains its head only."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("head."))
