"""A ResNet with the CIFAR stem (a 3x3 stride-1 first convolution, no max-pool), built from timm, and the split
BatchNorm that keeps a contrastive batch from cheating through its statistics on one process."""
import timm
import torch
import torch.nn.functional as F
from torch import nn

from cifar_mae.heads import classifier_head, freeze_all_but_head
from cifar_mae.knn import pooled_features


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from num_splits groups of the batch (sample i in group
    i % num_splits), each as if alone; the running statistics move by the mean of the groups' updates. In eval
    mode it is a plain BatchNorm2d (MoCo's CIFAR demo)."""

    def __init__(self, num_features, num_splits=1, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x):
        n, c, h, w = x.shape
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        s = self.num_splits
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        # (n, C, H, W) -> (n / s, s * C, H, W): channel block j holds the samples j, j + s, j + 2s, ...
        out = F.batch_norm(x.reshape(n // s, s * c, h, w), mean, var, self.weight.repeat(s), self.bias.repeat(s),
                           True, self.momentum, self.eps).reshape(n, c, h, w)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(s, c).mean(0))
            self.running_var.copy_(var.view(s, c).mean(0))
            self.num_batches_tracked += 1
        return out


def split_batch_norms(module, num_splits):
    """Every BatchNorm2d in `module` made a SplitBatchNorm2d with the same state (in place). -> module"""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm2d(child.num_features, num_splits, eps=child.eps, momentum=child.momentum)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            split_batch_norms(child, num_splits)
    return module


def cifar_resnet(arch="resnet18", in_chans=3, drop_path=0.0):
    """timm's ResNet without its classifier (-> pooled features (B, num_features)), its stem made CIFAR's."""
    model = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans, drop_path_rate=drop_path)
    model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as timm's other convs
    model.maxpool = nn.Identity()
    return model


class ResNetClassifier(nn.Module):
    """A linear head on a CIFAR ResNet's pooled features; with linear_probe the ResNet is frozen (eval mode, no
    gradient) and the head is a BatchNorm without affine parameters then the linear layer, as ViT_Classifier's."""
    backbone_prefix = "encoder."  # where the encoder's weights are

    def __init__(self, encoder, num_classes=10, linear_probe=False):
        super().__init__()
        self.encoder, self.linear_probe = encoder, linear_probe
        self.head = classifier_head(encoder.num_features, num_classes, linear_probe)
        if linear_probe:
            freeze_all_but_head(self)

    def train(self, mode=True):
        super().train(mode)
        if self.linear_probe:  # the frozen ResNet's BatchNorm statistics stay as pretrained
            self.encoder.eval()
        return self

    def group_matcher(self, coarse=False):
        """Layer ids for timm's layer-wise lr decay: the stem is layer 0, each residual block one more."""
        return dict(stem=r"^encoder\.conv1|^encoder\.bn1", blocks=[(r"^encoder\.layer(\d+)\.(\d+)", None)])

    def forward_features(self, imgs):
        return pooled_features(self.encoder, imgs)

    def forward(self, imgs):
        return self.head(self.forward_features(imgs))
