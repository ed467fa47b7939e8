"""MoCo pretraining (contrastive) of a CIFAR ResNet-18 or a ViT on CIFAR-10 (or any small image dataset).

    python moco_pretrain.py -c configs/moco_resnet18.yaml   # MoCo's CIFAR demo: writes resnet18-cifar-moco.pth
    tensorboard --logdir logs                               # loss, lr, kNN accuracy, similarities, projector
    python moco_pretrain.py --eval_only resnet18-cifar-moco.pth    # kNN accuracy
"""
import functools

import torch

from cifar_mae.checkpoint import make_checkpoint
from cifar_mae.cli import cli_main
from cifar_mae.errors import UserError, as_user_error
from cifar_mae.flags import ArgumentParser, add_augmentation_args, add_config_arg, add_encoder_args, add_runtime_args, \
    add_saved_model_args, add_training_args, check_backbone_flags, check_interval, check_training_args, path_arg
from cifar_mae.lifecycle import run
from cifar_mae.model_config import MoCoConfig, is_vil
from cifar_mae.moco import MoCo, moco_loss
from cifar_mae.optim import peak_lr
from cifar_mae.pretraining import PretrainingTask, add_monitor_args
from cifar_mae.resnet import split_batch_norms
from cifar_mae.views import TwoViewLoader
from model import build_encoder


def get_args_parser():
    parser = ArgumentParser("MoCo pretraining")
    add_config_arg(parser)
    add_training_args(parser, seed=0, batch_size=512, base_learning_rate=0.03, weight_decay=5e-4, total_epoch=200,
                      warmup_epoch=0, gpu_micro_batch=Pretraining.gpu_micro_batch, checkpoint_flag="--model_path",
                      optimizer="sgd")
    parser.add_argument("--model_path", type=path_arg, default=None,
                        help="checkpoint written after every epoch (default: MODEL-moco.pth)")
    model = add_encoder_args(parser.add_argument_group("model"))
    model.set_defaults(model="resnet18_cifar")
    moco = parser.add_argument_group("MoCo")
    moco.add_argument("--moco_version", type=int, default=2, choices=[2, 3],
                      help="2: MLP head, a queue of negatives; 3: predictor, in-batch negatives, momentum to 1")
    moco.add_argument("--moco_dim", type=int, default=128, help="width of the features compared")
    moco.add_argument("--moco_mlp_dim", type=int, default=2048, help="hidden width of v3's projector and predictor")
    moco.add_argument("--moco_k", type=int, default=4096, help="queue of negative keys (v2)")
    moco.add_argument("--moco_t", type=float, default=0.1, help="softmax temperature")
    moco.add_argument("--moco_m", type=float, default=0.99,
                      help="momentum of the key encoder (v3: where its cosine rise to 1 starts)")
    moco.add_argument("--symmetric", action="store_true", help="v2: the loss both ways (the CIFAR demo's best)")
    moco.add_argument("--bn_splits", type=int, default=8,
                      help="BatchNorm groups per micro-batch in a ResNet (1: plain BatchNorm); keys come from a "
                           "shuffled batch, so a query and its key never share a group's statistics")
    moco.add_argument("--freeze_patch_embed", action="store_true",
                      help="v3 with a ViT: keep the random patch projection fixed (moco-v3's stability trick)")
    augment = add_augmentation_args(parser.add_argument_group("augmentation (two views per image)"), [0.08, 1.0])
    augment.add_argument("--jitter", type=float, nargs=4, default=[0.4, 0.4, 0.4, 0.1],
                         metavar=("BRIGHTNESS", "CONTRAST", "SATURATION", "HUE"), help="colour jitter strengths")
    augment.add_argument("--jitter_prob", type=float, default=0.8, help="share of views colour-jittered")
    augment.add_argument("--gray_prob", type=float, default=0.2, help="share of views made grayscale")
    monitor = add_monitor_args(parser.add_argument_group("monitoring"), knn_every=1, knn_t=0.1)
    add_saved_model_args(monitor, "print a saved MoCo's kNN accuracy and exit",
                         "with --eval_only and a ViT: also write the encoder as a state_dict for timm's "
                         "VisionTransformer (num_classes=0)")
    return add_runtime_args(parser)


def check_args(args):
    if args.export_timm and not args.eval_only:
        raise UserError("--export_timm writes a saved MoCo's encoder: give the checkpoint with --eval_only")
    check_training_args(args, "moco_dim", "moco_mlp_dim", "moco_k", "moco_t", "bn_splits", "knn_k", "knn_t")
    check_interval(args, "[0, inf)", "weight_decay", "warmup_epoch", "knn_every", "embedding_images")
    check_interval(args, "[0, 1)", "moco_m")
    check_interval(args, "[0, 1]", "jitter_prob", "gray_prob")
    if min(args.jitter) < 0 or args.jitter[3] > 0.5:  # hue turns at most half a turn either way
        raise UserError(f"--jitter needs strengths of at least 0 and a hue of at most 0.5, got {args.jitter}")
    if args.loader != "device":
        raise UserError("moco_pretrain.py makes its two views on the device; --loader torch is not supported")
    if is_vil(args.model):
        raise UserError(f"--model {args.model} is a Vision-LSTM: MoCo here pretrains a ViT or a ResNet; train a ViL "
                        "with train_classifier.py")
    check_backbone_flags(args, "freeze_patch_embed", "export_timm")
    with torch.device("meta"):  # a configuration that cannot work fails here, before the data is read
        build_moco(moco_config(args))


def moco_config(args):
    return MoCoConfig.from_settings(args)


def build_moco(config):
    """MoCo around the encoder a config describes (a ResNet's BatchNorm split in config["bn_splits"] groups)."""
    c = MoCoConfig.of(config)
    with as_user_error():
        encoder = build_encoder(config)
    if c.resnet:
        split_batch_norms(encoder, c.bn_splits)
    if c.freeze_patch_embed:
        encoder.patch_embed.requires_grad_(False)
    return MoCo(encoder, encoder.num_features, c.moco_version, c.moco_dim, c.moco_mlp_dim, c.moco_k, c.moco_t,
                c.moco_m, c.symmetric, shuffle=bool(c.resnet))


class Pretraining(PretrainingTask):
    """MoCo pretraining: InfoNCE over two views; the key encoder and queue move after each optimizer step; after
    an epoch the kNN monitor of the query encoder."""
    kind, script, suffix, gpu_micro_batch = "moco_pretrain", __file__, "moco", 512
    no_weight_decay = {"encoder.cls_token", "encoder.pos_embed"}
    feature, labels_for = "pooled features", "--eval_only's kNN accuracy"  # training: the kNN monitor's, where on
    check_args = check_eval_args = staticmethod(check_args)
    build = staticmethod(build_moco)

    def build_model(self, rt, data):
        self.config = moco_config(self.args)
        return build_moco(self.config)

    def train_loader(self, rt, data):
        args = self.args
        images = data.pretraining_images()  # STL-10's unlabelled images too
        loader = TwoViewLoader(images, torch.zeros(len(images), dtype=torch.int64), args.batch_size,
                               device=rt.device, seed=args.seed, crop_scale=args.crop_scale, flip=args.flip,
                               interpolation=args.interpolation, rank=rt.rank, world_size=rt.world_size,
                               jitter=tuple(args.jitter), jitter_prob=args.jitter_prob, gray_prob=args.gray_prob)
        self.total_steps = len(loader) * args.total_epoch
        return loader

    def loss(self, data):
        return moco_loss

    def trainer_options(self, model):
        return dict(num_extra=2, after_step=functools.partial(model.after_step, total_steps=self.total_steps)), \
            (0.9, 0.999)

    def start(self, rt, data, model, trainer, log, steps, micro_batch):
        super().start(rt, data, model, trainer, log, steps, micro_batch)
        args = self.args
        if self.config.get("resnet") and micro_batch % args.bn_splits:
            raise UserError(f"--bn_splits {args.bn_splits} must divide the micro-batch ({micro_batch} images): pick "
                            "a --batch_size (or --max_device_batch_size) it divides, or another --bn_splits")
        if rt.is_main:
            encoder = sum(p.numel() for p in model.encoder.parameters()) / 1e6
            print(f"MoCo v{args.moco_version} pretraining of a {encoder:.2f}M-parameter encoder on {rt.device} "
                  f"({rt.world_size} process(es)), {steps} steps/epoch, micro-batch {micro_batch}, "
                  f"{args.optimizer} peak lr {peak_lr(args.base_learning_rate, args.batch_size):.2e}, "
                  f"{rt.describe()}")

    def after_epoch(self, epoch, metrics):
        positive, negative = (s / max(metrics["images"], 1) for s in metrics["extra_sums"])
        record = {"loss": metrics["loss"], "positive_similarity": positive, "negative_similarity": negative}
        record, text = self.monitor(epoch, record, f"loss {metrics['loss']:.4f}, similarity positive "
                                                   f"{positive:.3f} negative {negative:.3f}")
        self.log.scalars({"moco/loss": metrics["loss"], "moco/similarity/positive": positive,
                          "moco/similarity/negative": negative, "lr": metrics["lr"],
                          "images_per_s": metrics["images_per_s"], "knn_acc": record.get("knn_acc")}, epoch)
        return record, text

    def checkpoint(self, epoch, state):
        return make_checkpoint("moco_pretrain", self.model.state_dict(), self.config, epoch, **state)

@cli_main
def main(args):
    return run(Pretraining, args, get_args_parser())


if __name__ == "__main__":
    main(get_args_parser().parse_args())
