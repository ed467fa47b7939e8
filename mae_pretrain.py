"""MAE pretraining of a ViT on CIFAR-10 (or any small ImageFolder dataset).

    python mae_pretrain.py                      # ViT-T/2, 2000 epochs, writes vit-t-mae.pth
    tensorboard --logdir logs                   # mae_loss, lr, images/s, reconstructions
    python mae_pretrain.py --eval_only vit-t-mae.pth    # kNN accuracy and test reconstruction loss
"""
import os
import shlex

import torch

from cifar_mae.augment import normalize
from cifar_mae.checkpoint import make_checkpoint
from cifar_mae.cli import cli_main
from cifar_mae.console import script_command
from cifar_mae.datasets import spread_test_images
from cifar_mae.errors import UserError, as_user_error
from cifar_mae.flags import ArgumentParser, add_augmentation_args, add_config_arg, add_encoder_args, add_runtime_args, \
    add_training_args, check_interval, check_training_args, path_arg
from cifar_mae.knn import knn_monitor
from cifar_mae.lifecycle import Task, run
from cifar_mae.loaders import make_loader, unaugmented_loaders
from cifar_mae.model_config import MAEConfig, output_stem
from cifar_mae.optim import param_groups, peak_lr
from cifar_mae.outputs import claim_outputs
from cifar_mae.reconstruction import mae_loss, reconstruction_grid, reconstruction_loss
from cifar_mae.timm_export import encoder_export, write_timm_state
from model import MAE_ViT

GPU_MICRO_BATCH = 1024  # the micro-batch ceiling on a GPU when --max_device_batch_size is not given
NO_WEIGHT_DECAY = {"encoder.cls_token", "encoder.pos_embed", "decoder.mask_token", "decoder.pos_embed"}


def get_args_parser():
    parser = ArgumentParser("MAE pretraining")
    add_config_arg(parser)
    add_training_args(parser, seed=42, batch_size=4096, base_learning_rate=1.5e-4, weight_decay=0.05, total_epoch=2000,
                      warmup_epoch=200, gpu_micro_batch=GPU_MICRO_BATCH, checkpoint_flag="--model_path")
    parser.add_argument("--mask_ratio", type=float, default=0.75, help="fraction of patches hidden from the encoder")
    parser.add_argument("--model_path", type=path_arg, default=None,
                        help="checkpoint written after every epoch (default: vit-t-mae.pth for the default model, "
                             "else MODEL-mae.pth)")
    model = add_encoder_args(parser.add_argument_group("model"))
    model.add_argument("--decoder_layer", type=int, default=None, help="decoder blocks")
    model.add_argument("--decoder_head", type=int, default=None, help="decoder attention heads")
    model.add_argument("--decoder_emb_dim", type=int, default=None, help="decoder width (default: emb_dim)")
    model.add_argument("--norm_pix_loss", action="store_true", help="regress per-patch normalised pixels")
    parser.add_argument("--pretrain_split", default="train+unlabeled",
                        choices=["train+unlabeled", "train", "unlabeled"],
                        help="with STL-10, which images pretraining takes; other data have a training split only")
    add_augmentation_args(parser.add_argument_group("augmentation (per sample)"), [0.2, 1.0])
    monitor = parser.add_argument_group("monitoring")
    monitor.add_argument("--knn_every", type=int, default=0, help="kNN accuracy every N epochs (0: never)")
    monitor.add_argument("--knn_k", type=int, default=200, help="neighbours that vote")
    monitor.add_argument("--knn_t", type=float, default=0.07, help="temperature of the votes, exp(similarity / T)")
    monitor.add_argument("--image_every", type=int, default=None,
                         help="log the reconstruction image every N epochs and after the last (default: about 100 "
                              "images a run, every epoch up to 100 epochs)")
    monitor.add_argument("--eval_only", type=path_arg, default=None, metavar="CHECKPOINT",
                         help="print a saved MAE's kNN accuracy and test-set reconstruction loss (at --mask_ratio if "
                              "given, else the checkpoint's) and exit")
    monitor.add_argument("--export_timm", type=path_arg, default=None, metavar="PATH",
                         help="with --eval_only: also write the encoder as a state_dict for timm's VisionTransformer "
                              "(num_classes=0: a backbone to fine-tune with timm)")
    return add_runtime_args(parser)


def check_args(args):
    if args.export_timm and not args.eval_only:
        raise UserError("--export_timm writes a saved MAE's encoder: give the checkpoint with --eval_only")
    check_training_args(args, "decoder_layer", "decoder_head", "decoder_emb_dim", "knn_k", "knn_t", "image_every")
    check_interval(args, "[0, inf)", "weight_decay", "warmup_epoch", "knn_every", "num_workers")
    check_interval(args, "(0, 1)", "mask_ratio")  # the loss is taken over masked patches only
    with torch.device("meta"):  # a configuration that cannot work fails here, before the data is read; no memory
        build_mae(mae_config(args))


def build_mae(config):
    with as_user_error():
        return MAE_ViT(**config)


def mae_config(args):
    return MAEConfig.from_settings(args, decoder_emb_dim=args.decoder_emb_dim or args.emb_dim)


def image_due(args, epoch):
    """Whether the reconstruction image is logged after `epoch` epochs (1-based): every --image_every, and the last."""
    every = args.image_every or max(1, args.total_epoch // 100)
    return epoch % every == 0 or epoch == args.total_epoch


def knn(args, model, loaders, data, rt):
    """kNN accuracy of the encoder's cls feature with --knn_k and --knn_t, the training set as memory."""
    return knn_monitor(model.encoder, *loaders, len(data.classes), rt, k=args.knn_k, temperature=args.knn_t)


class Pretraining(Task):
    """MAE pretraining: the masked-patch loss; after an epoch the kNN monitor and the reconstruction figure."""
    kind, script, gpu_micro_batch = "mae_pretrain", __file__, GPU_MICRO_BATCH
    check_args = check_eval_args = staticmethod(check_args)

    def __init__(self, args, ckpt, defaults):
        super().__init__(args, ckpt, defaults)
        self.labels_for = f"the kNN monitor (--knn_every {args.knn_every}; pass 0)" if args.knn_every else None

    @classmethod
    def default_checkpoint(cls, args):
        return args.model_path or f"{output_stem(args.model)}-mae.pth"

    @classmethod
    def name_outputs(cls, args):
        args.model_path = cls.default_checkpoint(args)
        return args.model_path

    def claim_outputs(self, restarting):
        claim_outputs(self.args, self.args.model_path, "--model_path", restarting, resume_path=self.args.model_path)

    def build_model(self, rt, data):
        return build_mae(mae_config(self.args))

    def train_loader(self, rt, data):
        images = data.pretraining_images(self.args.pretrain_split)  # labels play no part
        return make_loader(self.args, rt, images, torch.zeros(len(images), dtype=torch.int64), self.args.batch_size,
                           train=True, crop_scale=self.args.crop_scale, flip=self.args.flip)

    def loss(self, data):
        return mae_loss

    def param_groups(self, model):
        return param_groups(model, self.args.weight_decay, NO_WEIGHT_DECAY)

    def trainer_options(self, model):
        return {}, (0.9, 0.95)

    def start(self, rt, data, model, trainer, log, steps, micro_batch):
        args, self.rt, self.data, self.model, self.log = self.args, rt, data, model, log
        self.val_images = normalize(spread_test_images(data)).to(rt.device)
        self.knn_loaders = unaugmented_loaders(args, rt, data) if args.knn_every else None
        if rt.is_main:
            print(f"pretraining {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {rt.device} "
                  f"({rt.world_size} process(es)), {steps} steps/epoch, micro-batch {micro_batch}, peak lr "
                  f"{peak_lr(args.base_learning_rate, args.batch_size):.2e}, {rt.describe()}, loader {args.loader}")

    def after_epoch(self, epoch, metrics):
        args, record, text = self.args, {"loss": metrics["loss"]}, f"loss {metrics['loss']:.4f}"
        if args.knn_every and epoch % args.knn_every == 0:
            record["knn_acc"] = knn(args, self.model, self.knn_loaders, self.data, self.rt)
            text += f", kNN {record['knn_acc']:.2%}"
        self.log.scalars({"mae_loss": metrics["loss"], "lr": metrics["lr"], "images_per_s": metrics["images_per_s"],
                          "knn_acc": record.get("knn_acc")}, epoch)
        if self.rt.is_main and image_due(args, epoch):
            self.log.image("mae_image", reconstruction_grid(self.model, self.val_images, self.rt), epoch)
        return record, text

    def checkpoint(self, epoch, state):
        return make_checkpoint("mae_pretrain", self.model.state_dict(), self.model.config, epoch, **state)

    def finish(self, done):
        if done and self.rt.is_main:
            next_script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_classifier.py")
            print(f"pretrained {self.args.model_path}; fine-tune it with: python {script_command(next_script)} "
                  f"--pretrained_model_path {shlex.quote(self.args.model_path)}")

    # ---- --eval_only
    @classmethod
    def saved_model(cls, ckpt, rt):
        model = build_mae(ckpt["model_config"])
        model.load_state_dict(ckpt["model"])
        return model

    @classmethod
    def report_saved(cls, args, rt, ckpt, model, data):
        """kNN accuracy (with labels) and the test set's reconstruction loss at --mask_ratio."""
        loaders = unaugmented_loaders(args, rt, data)
        result = {"epoch": ckpt["epoch"], "mask_ratio": args.mask_ratio,
                  "test_loss": reconstruction_loss(model, loaders[1], rt, args.mask_ratio),
                  "knn_acc": knn(args, model, loaders, data, rt) if data.classes else None}
        if rt.is_main:
            knn_text = "" if result["knn_acc"] is None else f"kNN accuracy {result['knn_acc']:.2%} (k {args.knn_k}, " \
                f"T {args.knn_t}, cls feature, training set as memory), "
            print(f"{args.eval_only} (epoch {ckpt['epoch']}): {knn_text}test reconstruction loss "
                  f"{result['test_loss']:.4f} at mask ratio {args.mask_ratio}")
            if args.export_timm:
                write_timm_state(*encoder_export(model), args.export_timm)
        return result


@cli_main
def main(args):
    return run(Pretraining, args, get_args_parser())


if __name__ == "__main__":
    main(get_args_parser().parse_args())
