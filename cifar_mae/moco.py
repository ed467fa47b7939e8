"""MoCo: a query encoder trained to pick its image's key, made by a momentum-updated copy of itself, out of
negatives (He et al. 2020, facebookresearch/moco). v2: an MLP projection and a queue of the keys of past
batches; v3 (Chen et al. 2021, facebookresearch/moco-v3): a predictor, the other keys of the batch as negatives,
a symmetric loss scaled by 2T and a momentum rising to 1 on a cosine.

The momentum update and the queue update run once per optimizer step, after it (after_step): with gradient
accumulation every micro-batch of a step sees the same key encoder and queue, as one big batch would."""
import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils import unwrap_model
from torch import nn

from cifar_mae.knn import pooled_features


def mlp(dim_in, hidden, dim_out, layers, last_bn):
    """Linear-BN-ReLU layers then a linear one (with a BatchNorm without affine parameters after it if
    last_bn), as moco-v3's _build_mlp."""
    modules, width = [], dim_in
    for _ in range(layers - 1):
        modules += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        width = hidden
    modules.append(nn.Linear(width, dim_out, bias=not last_bn))
    if last_bn:
        modules.append(nn.BatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*modules)


def moco_loss(model, views, labels):
    """The Trainer's loss of a MoCo (`model` as it runs: compiled, under DDP). The keys wait in the MoCo's pending
    list for after_step, appended here rather than in forward: a list that grows inside a compiled forward would
    recompile it at every micro-batch."""
    loss, stats, keys = model(views)
    if keys is not None:
        unwrap_model(model).pending.append(keys)
    return loss, stats


def gather_keys(keys):
    """The keys of every process, in rank order (no gradient flows through keys)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys
    gathered = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, keys.contiguous())
    return torch.cat(gathered)


class MoCo(nn.Module):
    """encoder: the backbone (forward_features + forward_head(pre_logits=True), as timm's models);
    feature_dim: its pooled width. forward(views (n, 2, C, H, W)) -> (loss, [sum of positive similarities,
    sum of mean negative similarities], the keys for the queue (v2; v3: None)); moco_loss keeps the keys for
    after_step. shuffle: keys made from a shuffled batch (BatchNorm backbones)."""

    def __init__(self, encoder, feature_dim, version=2, dim=128, mlp_dim=2048, queue_size=4096, temperature=0.1,
                 momentum=0.99, symmetric=False, shuffle=False):
        super().__init__()
        self.version, self.temperature, self.base_momentum = version, temperature, momentum
        self.symmetric, self.shuffle = symmetric, shuffle
        self.encoder = encoder
        if version == 2:  # MoCo v2's head: the backbone's fc made a two-layer MLP
            self.projector = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True),
                                           nn.Linear(feature_dim, dim))
            self.predictor = None
            self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        else:
            self.projector = mlp(feature_dim, mlp_dim, dim, 3, last_bn=True)
            self.predictor = mlp(dim, mlp_dim, dim, 2, last_bn=False)
        self.momentum_encoder = copy.deepcopy(encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for param in self.momentum_parameters():
            param.requires_grad_(False)
        self.pending = []  # this step's keys, for the queue

    def momentum_parameters(self):
        return list(self.momentum_encoder.parameters()) + list(self.momentum_projector.parameters())

    def query(self, x):
        q = self.projector(pooled_features(self.encoder, x))
        return self.predictor(q) if self.predictor is not None else q

    @torch.no_grad()
    def key(self, x):
        """The key encoder's output; with shuffle, made from the batch in a random order and put back, so a
        query and its key never share a BatchNorm group's statistics."""
        if not self.shuffle:
            return self.momentum_projector(pooled_features(self.momentum_encoder, x))
        order = torch.randperm(x.shape[0], device=x.device)
        k = self.momentum_projector(pooled_features(self.momentum_encoder, x[order]))
        return torch.empty_like(k).index_copy_(0, order, k)

    def forward(self, views):
        x1, x2 = views[:, 0], views[:, 1]
        if self.version == 3:
            q1, q2, k1, k2 = self.query(x1), self.query(x2), self.key(x1), self.key(x2)
            loss12, stats12 = self.in_batch_loss(q1, k2)
            loss21, stats21 = self.in_batch_loss(q2, k1)
            return loss12 + loss21, (stats12 + stats21) / 2, None
        loss, stats, keys = self.queue_loss(self.query(x1), self.key(x2))
        if self.symmetric:  # MoCo's CIFAR demo: both directions, summed; both keys go to the queue
            loss21, stats21, keys21 = self.queue_loss(self.query(x2), self.key(x1))
            loss, stats, keys = loss + loss21, (stats + stats21) / 2, torch.cat([keys, keys21])
        return loss, stats, keys

    def queue_loss(self, q, k):
        """v2: the positive logit q.k first, then q against every key in the queue, over T."""
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
        positive = (q * k).sum(dim=1, keepdim=True)
        negative = q @ self.queue.T
        logits = torch.cat([positive, negative], dim=1) / self.temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        stats = torch.stack([positive.sum(), negative.mean(dim=1).sum()])
        return F.cross_entropy(logits, labels), stats.detach(), k

    def in_batch_loss(self, q, k):
        """v3: q against the keys of the whole batch (every process's), its own key the positive, times 2T."""
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
        keys = gather_keys(k)
        logits = q @ keys.T / self.temperature
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
        positive = logits.gather(1, labels[:, None])[:, 0] * self.temperature
        negative = (logits.sum(dim=1) * self.temperature - positive) / max(keys.shape[0] - 1, 1)
        stats = torch.stack([positive.sum(), negative.sum()])
        return F.cross_entropy(logits, labels) * 2 * self.temperature, stats.detach()

    def momentum_at(self, step, total_steps):
        """The key encoder's momentum before optimizer step `step` (0-based): fixed in v2; in v3 rising from the
        base momentum to 1 on a half cosine over the run."""
        if self.version == 2:
            return self.base_momentum
        return 1 - 0.5 * (1 + math.cos(math.pi * step / total_steps)) * (1 - self.base_momentum)

    @torch.no_grad()
    def after_step(self, step, total_steps):
        """After optimizer step `step`: the key encoder moves towards the query encoder with the momentum of the
        next step; the step's keys (every process's, in rank order) replace the oldest in the queue."""
        momentum = self.momentum_at(step + 1, total_steps)
        query = list(self.encoder.parameters()) + list(self.projector.parameters())
        torch._foreach_lerp_(self.momentum_parameters(), query, 1 - momentum)
        if self.version == 2 and self.pending:
            keys = gather_keys(torch.cat(self.pending))
            self.pending = []
            where = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % self.queue.shape[0]
            self.queue.index_copy_(0, where, keys.to(self.queue.dtype))
            self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % self.queue.shape[0])
