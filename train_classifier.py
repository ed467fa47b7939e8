"""Train a ViT classifier on CIFAR-10: from scratch, fine-tuned from an MAE checkpoint, or as a linear probe.

    python train_classifier.py                                            # from scratch
    python train_classifier.py --pretrained_model_path vit-t-mae.pth      # fine-tune the MAE encoder
    python train_classifier.py --eval_only vit-t-classifier.pth           # top-1, top-5, per-class table
"""
import os

from timm.utils import ModelEmaV3

from cifar_mae.atomic import save_atomic
from cifar_mae.checkpoint import evaluated_weights, last_checkpoint_path, make_checkpoint
from cifar_mae.classification import BestEpoch, ClassificationLoss, check_classes, evaluate, final_report, log_epoch, \
    report_saved_classifier, selection_split, start_note
from cifar_mae.cli import cli_main
from cifar_mae.errors import UserError, as_user_error
from cifar_mae.flags import ArgumentParser, add_augmentation_args, add_config_arg, add_encoder_args, add_runtime_args, \
    add_saved_model_args, add_training_args, check_backbone_flags, check_interval, check_training_args, path_arg
from cifar_mae.lifecycle import Task, run
from cifar_mae.loaders import make_loader
from cifar_mae.model_config import ClassifierConfig, is_vil, output_stem, resnet_arch
from cifar_mae.optim import peak_lr
from cifar_mae.pretrained import load_encoder, read_pretrained
from cifar_mae.randaug import check_policy
from cifar_mae.settings import plain_args
from model import build_classifier, check_config


def get_args_parser():
    parser = ArgumentParser("ViT classifier")
    add_config_arg(parser)
    add_training_args(parser, seed=2022, batch_size=128, base_learning_rate=1e-3, weight_decay=0.05, total_epoch=100,
                      warmup_epoch=5, gpu_micro_batch=Classification.gpu_micro_batch,
                      checkpoint_flag="--output_model_path",
                      weight_decay_help="none on biases, norms, cls token, position embeddings")
    parser.add_argument("--pretrained_model_path", type=path_arg, default=None,
                        help="MAE checkpoint whose encoder to fine-tune, or a timm VisionTransformer state_dict "
                             "that fits --model (resampled to its image and patch size); none: train from scratch")
    parser.add_argument("--output_model_path", type=path_arg, default=None,
                        help="best-accuracy weights; the full training state goes to NAME-last.pth beside it "
                             "(default: vit-t-classifier-from_pretrained.pth or vit-t-classifier-from_scratch.pth for "
                             "the default model, else MODEL-classifier-...)")
    parser.add_argument("--val_size", type=int, default=0,
                        help="hold out this many training images (a fixed random subset) and pick the best epoch on "
                             "them instead of on the test set, which is then only used for the final report")
    model = add_encoder_args(
        parser.add_argument_group("model (from scratch; a pretrained checkpoint brings its own sizes)"))
    model.add_argument("--global_pool", action="store_true", help="mean of patch tokens + norm instead of cls")
    model.add_argument("--vil_pooling", default=None, choices=["bilateral_flatten", "bilateral_avg"],
                       help="a Vision-LSTM's pooling: its first and last token side by side, or their mean "
                            "(default: bilateral_flatten, the reference's)")
    model.add_argument("--vil_conv", default=None, choices=["2d", "causal1d"],
                       help="a Vision-LSTM's convolution: 3x3 over the patch grid, or causal over the sequence "
                            "(default: 2d, the reference's)")
    model.add_argument("--drop_path", type=float, default=0.0, help="stochastic depth rate of the last block")
    model.add_argument("--linear_probe", action="store_true",
                       help="freeze the encoder (eval mode, no gradient); train BatchNorm + linear head")
    recipe = add_augmentation_args(parser.add_argument_group("recipe"), [0.35, 1.0])
    recipe.add_argument("--randaug", default=None,
                        help="timm RandAugment policy, e.g. rand-m9-mstd0.5-inc1 (per sample on the device, "
                             "or timm's own on PIL images with --loader torch)")
    recipe.add_argument("--reprob", type=float, default=0.0,
                        help="random erasing probability (timm's RandomErasing, mode pixel; per sample on the device)")
    recipe.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    recipe.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    recipe.add_argument("--mix_prob", type=float, default=1.0,
                        help="share of batches mixed when --mixup or --cutmix is on (timm Mixup's prob)")
    recipe.add_argument("--mix_switch_prob", type=float, default=0.5,
                        help="with both on: share of the mixed batches that take cutmix rather than mixup")
    recipe.add_argument("--tta", default="none", choices=["none", "flip"],
                        help="flip: also report the top-1 of each image's and its mirror image's mean logits")
    recipe.add_argument("--label_smoothing", type=float, default=0.0, help="of the (mixed) targets")
    recipe.add_argument("--layer_decay", type=float, default=None, help="layer-wise lr decay, e.g. 0.75")
    recipe.add_argument("--clip_grad", type=float, default=None, help="clip the gradient norm to this")
    recipe.add_argument("--ema", action="store_true", help="keep an EMA of the weights; evaluate and save it")
    recipe.add_argument("--ema_decay", type=float, default=0.9999, help="per optimizer step")
    actions = parser.add_argument_group("other jobs")
    add_saved_model_args(actions, "evaluate a saved classifier on the test set and exit",
                         "also write the classifier as a state_dict for timm's VisionTransformer")
    actions.add_argument("--export_vil", type=path_arg, default=None, metavar="PATH",
                         help="also write a Vision-LSTM classifier as a state_dict for the reference's VisionLSTM2 "
                              "(NX-AI/vision-lstm)")
    return add_runtime_args(parser)


def check_args(args):
    check_training_args(args, "clip_grad")
    check_interval(args, "[0, inf)", "weight_decay", "warmup_epoch", "mixup", "cutmix", "num_workers", "val_size")
    check_interval(args, "[0, 1)", "label_smoothing", "drop_path")
    check_interval(args, "[0, 1]", "reprob", "mix_prob", "mix_switch_prob")
    check_interval(args, "(0, 1]", "layer_decay")
    check_interval(args, "(0, 1)", "ema_decay")
    if args.linear_probe and args.drop_path:
        raise UserError("--linear_probe keeps the encoder frozen; --drop_path would have nothing to act on")
    check_backbone_flags(args, "global_pool", "export_timm")
    if not (args.pretrained_model_path or resnet_arch(args.model) or is_vil(args.model)):  # fails before the data
        with as_user_error():
            check_config(args.image_size, args.patch_size, {"encoder": args.emb_dim}, {"encoder": args.encoder_head})
    if args.randaug:  # a bad policy fails here, before the data is loaded
        check_policy(args.randaug, args.loader)


class Classification(Task):
    """A classifier: cross-entropy with mixup/cutmix; after an epoch the evaluation that picks the best weights
    (the EMA's with --ema), which go to --output_model_path; the full state to NAME-last.pth beside it."""
    kind, script, labels_for, output_setting = "classifier", __file__, "a classifier", "output_model_path"
    check_args = check_eval_args = staticmethod(check_args)
    gpu_micro_batch, no_weight_decay = 256, {"cls_token", "pos_embed"}

    def __init__(self, args, ckpt, defaults):
        super().__init__(args, ckpt, defaults)
        self.pretrained, self.pretrained_note = defaults or (None, None)
        self.even_micro_batch = bool(args.mixup or args.cutmix)  # mixup pairs the images of a micro-batch
        self.best = BestEpoch(args.val_size, ckpt)

    @classmethod
    def output_path(cls, args):
        """A name that says whether the encoder started pretrained, when not given."""
        return args.output_model_path or \
            f"{output_stem(args.model)}-classifier-from_{'pretrained' if args.pretrained_model_path else 'scratch'}.pth"

    @classmethod
    def default_checkpoint(cls, args):
        return last_checkpoint_path(cls.output_path(args))

    @classmethod
    def take_defaults(cls, args, parser, ckpt):
        return read_pretrained(args, parser)

    def build_model(self, rt, data):
        """Resumed, from a pretrained encoder, or from scratch."""
        args, self.data = self.args, data
        if self.ckpt is not None:
            check_classes(self.ckpt, data, f"--resume {args.resume}")
        self.config = self.ckpt["model_config"] if self.ckpt is not None else \
            ClassifierConfig.from_settings(args, num_classes=len(data.classes))
        with as_user_error():  # a configuration that cannot work
            model = build_classifier(self.config, args.drop_path)
        if self.pretrained is not None:  # only on a start that is not a resume
            load_encoder(model, self.pretrained, f"--pretrained_model_path {args.pretrained_model_path}")
        return model

    def train_loader(self, rt, data):
        args = self.args
        train_images, train_labels, val_images, val_labels = selection_split(data, args.val_size)
        self.test = self.eval_loader(rt, data.test_images, data.test_labels)
        self.val = self.eval_loader(rt, val_images, val_labels) if args.val_size else self.test
        return make_loader(rt, train_images, train_labels, args.batch_size, train=True, crop_scale=args.crop_scale,
                           flip=args.flip, randaug=args.randaug, reprob=args.reprob, **self.loader_options())

    def loss(self, data):
        args = self.args
        return ClassificationLoss(len(data.classes), args.mixup, args.cutmix, args.mix_prob, args.mix_switch_prob,
                                  args.label_smoothing)

    def trainer_options(self, model):
        ema = ModelEmaV3(model, decay=self.args.ema_decay) if self.args.ema else None
        return dict(clip_grad=self.args.clip_grad, ema=ema, num_extra=1), (0.9, 0.999)

    def start(self, rt, data, model, trainer, log, steps, micro_batch):
        args, self.rt, self.model, self.log = self.args, rt, model, log
        self.eval_model = trainer.ema.module if args.ema else model  # the weights evaluated and saved
        if rt.is_main:
            start_note(rt, model, steps, micro_batch, peak_lr(args.base_learning_rate, args.batch_size),
                       self.best.selected_on, pretrained_path=args.pretrained_model_path, pretrained=self.pretrained,
                       linear_probe=args.linear_probe, ema_decay=args.ema_decay if args.ema else None,
                       total_epoch=args.total_epoch, data_note=self.pretrained_note)

    def after_epoch(self, epoch, train):
        val = evaluate(self.eval_model, self.val, self.rt, len(self.data.classes), self.args.tta)
        if self.best.update(val["acc"], epoch, self.eval_model) and self.rt.is_main:
            self.save_best()
        return log_epoch(self.log, epoch, train, val, self.best.acc)

    def save_best(self):
        best = self.best
        save_atomic(make_checkpoint("classifier", best.model, self.config, best.epoch, classes=list(self.data.classes),
                                    acc=best.acc, selected_on=best.selected_on, args=plain_args(self.args)),
                    self.args.output_model_path)

    def checkpoint(self, epoch, state):
        """The best weights too: a resume needs no other file, on any machine."""
        return make_checkpoint("classifier", self.model.state_dict(), self.config, epoch,
                               classes=list(self.data.classes), **self.best.state(), **state)

    def finish(self, done):
        args = self.args
        if not done:
            return {"best_acc": self.best.acc}
        if self.rt.is_main and not os.path.isfile(args.output_model_path):  # gone since an earlier start
            self.save_best()
        return final_report(self.rt, self.log, self.eval_model, self.best, self.test, self.data, self.config,
                            tta=args.tta, step=args.total_epoch, exports=(args.export_timm, args.export_vil))

    # ---- --eval_only: the model from saved_model (build, saved_weights)
    build, saved_weights = staticmethod(build_classifier), staticmethod(evaluated_weights)

    def report_saved(self, rt, ckpt, model, data):
        """Top-1, top-5 and the per-class table on the test set; the exports."""
        args = self.args
        check_classes(ckpt, data, f"--eval_only {args.eval_only}")
        loader = self.eval_loader(rt, data.test_images, data.test_labels)
        return report_saved_classifier(rt, ckpt, model, loader, data, args.tta, (args.export_timm, args.export_vil))


@cli_main
def main(args):
    return run(Classification, args, get_args_parser())


if __name__ == "__main__":
    main(get_args_parser().parse_args())
