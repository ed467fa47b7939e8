"""MAE pretraining of a ViT on CIFAR-10 (or any small ImageFolder dataset).

    python mae_pretrain.py                      # ViT-T/2, 2000 epochs, writes vit-t-mae.pth
    tensorboard --logdir logs                   # mae_loss, lr, images/s, reconstructions
    python mae_pretrain.py --eval_only vit-t-mae.pth    # kNN accuracy and test reconstruction loss
"""
import torch

from cifar_mae.augment import normalize
from cifar_mae.checkpoint import make_checkpoint
from cifar_mae.cli import cli_main
from cifar_mae.datasets import spread_test_images
from cifar_mae.errors import UserError, as_user_error
from cifar_mae.flags import ArgumentParser, add_augmentation_args, add_config_arg, add_encoder_args, add_runtime_args, \
    add_saved_model_args, add_training_args, check_interval, check_training_args, path_arg
from cifar_mae.lifecycle import run
from cifar_mae.loaders import make_loader
from cifar_mae.model_config import MAEConfig, is_vil
from cifar_mae.optim import peak_lr
from cifar_mae.pretraining import PretrainingTask, add_monitor_args
from cifar_mae.reconstruction import mae_loss, reconstruction_grid, reconstruction_loss
from model import MAE_ViT


def get_args_parser():
    parser = ArgumentParser("MAE pretraining")
    add_config_arg(parser)
    add_training_args(parser, seed=42, batch_size=4096, base_learning_rate=1.5e-4, weight_decay=0.05, total_epoch=2000,
                      warmup_epoch=200, gpu_micro_batch=Pretraining.gpu_micro_batch, checkpoint_flag="--model_path")
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
    monitor = add_monitor_args(parser.add_argument_group("monitoring"), knn_every=0, knn_t=0.07)
    monitor.add_argument("--image_every", type=int, default=None,
                         help="log the reconstruction image every N epochs and after the last (default: about 100 "
                              "images a run, every epoch up to 100 epochs)")
    add_saved_model_args(monitor, "print a saved MAE's kNN accuracy and test-set reconstruction loss (at "
                         "--mask_ratio if given, else the checkpoint's) and exit",
                         "with --eval_only: also write the encoder as a state_dict for timm's VisionTransformer "
                         "(num_classes=0: a backbone to fine-tune with timm)")
    return add_runtime_args(parser)


def check_args(args):
    if is_vil(args.model):
        raise UserError(f"--model {args.model} is a Vision-LSTM, whose 2-D convolution needs the whole patch grid, "
                        "which masking removes (docs/your_data_your_backbone.md); train it with train_classifier.py")
    if args.export_timm and not args.eval_only:
        raise UserError("--export_timm writes a saved MAE's encoder: give the checkpoint with --eval_only")
    check_training_args(args, "decoder_layer", "decoder_head", "decoder_emb_dim", "knn_k", "knn_t", "image_every")
    check_interval(args, "[0, inf)", "weight_decay", "warmup_epoch", "knn_every", "num_workers", "embedding_images")
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


class Pretraining(PretrainingTask):
    """MAE pretraining: the masked-patch loss; after an epoch the kNN monitor and the reconstruction figure."""
    kind, script, suffix, gpu_micro_batch = "mae_pretrain", __file__, "mae", 1024
    no_weight_decay = {"encoder.cls_token", "encoder.pos_embed", "decoder.mask_token", "decoder.pos_embed"}
    feature = "cls feature"
    check_args = check_eval_args = staticmethod(check_args)
    build = staticmethod(build_mae)

    def build_model(self, rt, data):
        return self.build(mae_config(self.args))

    def train_loader(self, rt, data):
        images = data.pretraining_images(self.args.pretrain_split)  # labels play no part
        return make_loader(rt, images, torch.zeros(len(images), dtype=torch.int64), self.args.batch_size, train=True,
                           crop_scale=self.args.crop_scale, flip=self.args.flip, **self.loader_options())

    def loss(self, data):
        return mae_loss

    def trainer_options(self, model):
        return {}, (0.9, 0.95)

    def start(self, rt, data, model, trainer, log, steps, micro_batch):
        super().start(rt, data, model, trainer, log, steps, micro_batch)
        args, self.val_images = self.args, normalize(spread_test_images(data)).to(rt.device)
        if rt.is_main:
            print(f"pretraining {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {rt.device} "
                  f"({rt.world_size} process(es)), {steps} steps/epoch, micro-batch {micro_batch}, peak lr "
                  f"{peak_lr(args.base_learning_rate, args.batch_size):.2e}, {rt.describe()}, loader {args.loader}")

    def after_epoch(self, epoch, metrics):
        args = self.args
        record, text = self.monitor(epoch, {"loss": metrics["loss"]}, f"loss {metrics['loss']:.4f}")
        self.log.scalars({"mae_loss": metrics["loss"], "lr": metrics["lr"], "images_per_s": metrics["images_per_s"],
                          "knn_acc": record.get("knn_acc")}, epoch)
        if self.rt.is_main and image_due(args, epoch):
            self.log.image("mae_image", reconstruction_grid(self.model, self.val_images, self.rt), epoch)
        return record, text

    def checkpoint(self, epoch, state):
        return make_checkpoint("mae_pretrain", self.model.state_dict(), self.model.config, epoch, **state)

    # ---- --eval_only
    def saved_scores(self, rt, model, loaders, result):
        """The test set's reconstruction loss at --mask_ratio."""
        ratio = self.args.mask_ratio
        result.update(mask_ratio=ratio, test_loss=reconstruction_loss(model, loaders[1], rt, ratio))
        return [f"test reconstruction loss {result['test_loss']:.4f} at mask ratio {ratio}"]


@cli_main
def main(args):
    return run(Pretraining, args, get_args_parser())


if __name__ == "__main__":
    main(get_args_parser().parse_args())
