"""Weighted kNN accuracy of an encoder's features: the pretraining monitor."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cifar_mae.loaders import eval_batches
from cifar_mae.runtime import evaluating


@torch.no_grad()
def extract_features(forward, loader, rt, desc):
    """Features and labels of a whole split (no augmentation), gathered from all ranks in dataset order."""
    feats, labels = [], []
    for images, y in eval_batches(loader, rt, desc):
        with rt.autocast():
            feats.append(forward(images).float())
        labels.append(y)
    feats, labels = torch.cat(feats), torch.cat(labels)
    if rt.distributed:  # shards are order[rank::world]: interleave them back
        sizes = [None] * rt.world_size
        dist.all_gather_object(sizes, feats.shape[0])
        width = max(sizes)
        pad = lambda t: torch.cat([t, t.new_zeros((width - t.shape[0],) + t.shape[1:])])
        all_f = [torch.empty_like(pad(feats)) for _ in sizes]
        all_y = [torch.empty_like(pad(labels)) for _ in sizes]
        dist.all_gather(all_f, pad(feats))
        dist.all_gather(all_y, pad(labels))
        feats = torch.stack(all_f, 1).flatten(0, 1)
        labels = torch.stack(all_y, 1).flatten(0, 1)
        keep = torch.stack([torch.arange(width, device=feats.device) < s for s in sizes], 1).flatten()
        feats, labels = feats[keep], labels[keep]
    return feats, labels


@torch.no_grad()
def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, k=200, temperature=0.07,
                 chunk=1024):
    """Weighted kNN (InstDisc / MoCo monitor): cosine similarity, top-k neighbours voting exp(sim / T).

    Each query's votes are scaled by exp(-its top similarity / T), which changes no decision and keeps a small
    T from overflowing to inf (where every class would tie)."""
    train_feats = F.normalize(train_feats.float(), dim=1)
    test_feats = F.normalize(test_feats.float(), dim=1)
    k = min(k, train_feats.shape[0])
    correct = 0
    for start in range(0, test_feats.shape[0], chunk):
        sim = test_feats[start:start + chunk] @ train_feats.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], ((top_sim - top_sim[:, :1]) / temperature).exp())
        correct += (votes.argmax(dim=1) == test_labels[start:start + chunk]).sum()
    return float(correct) / test_feats.shape[0]


def pooled_features(encoder, x):
    """An encoder's image features (B, D), as timm's models give them: the ViT's cls token, the ResNet's pool."""
    return encoder.forward_head(encoder.forward_features(x), pre_logits=True)


def knn_monitor(encoder, train_loader, test_loader, num_classes, rt, k=200, temperature=0.07):
    """kNN accuracy of the encoder's pooled features (pooled_features); no gradients, mode restored, no global
    RNG drawn."""
    forward = lambda x: pooled_features(encoder, x)
    with evaluating(encoder):
        train = extract_features(forward, train_loader, rt, "kNN: training-set features")
        test = extract_features(forward, test_loader, rt, "kNN: test-set features")
    return knn_accuracy(*train, *test, num_classes, k=k, temperature=temperature)
