"""What the pretraining jobs (MAE, MoCo) share: their checkpoint (--model_path), the kNN monitor of the encoder,
its test-set features in TensorBoard's embedding projector, and the command that fine-tunes what they learned."""
import os
import shlex
import shutil
import sys

import torch

from cifar_mae.augment import normalize
from cifar_mae.console import script_command
from cifar_mae.datasets import spread_test_indexes
from cifar_mae.knn import knn_monitor, pooled_features
from cifar_mae.lifecycle import Task
from cifar_mae.model_config import output_stem
from cifar_mae.runtime import evaluating
from cifar_mae.timm_export import encoder_export, write_timm_state

EMBEDDING_TAG = "test_features"
CLASSIFIER_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_classifier.py")


def add_monitor_args(group, knn_every, knn_t):
    group.add_argument("--knn_every", type=int, default=knn_every, help="kNN accuracy every N epochs (0: never)")
    group.add_argument("--knn_k", type=int, default=200, help="neighbours that vote")
    group.add_argument("--knn_t", type=float, default=knn_t, help="temperature of the votes, exp(similarity / T)")
    group.add_argument("--embedding_images", type=int, default=2000,
                       help="test images (spread over the classes) whose features, labels and thumbnails go to "
                            "TensorBoard's embedding projector at the end of a run and with --eval_only (0: none)")
    return group


@torch.no_grad()
def write_embedding(writer, encoder, data, rt, count, step):
    """The pooled features of `count` test images, with their class names and thumbnails, to TensorBoard's
    embedding projector (PCA, t-SNE and UMAP are then a click away in the browser)."""
    index = spread_test_indexes(data, count)
    images, feats = data.test_images[index], []
    with evaluating(encoder):
        for batch in images.split(1024):
            with rt.autocast():
                feats.append(pooled_features(encoder, normalize(batch.to(rt.device))).float().cpu())
    labels = [data.classes[i] for i in data.test_labels[index].tolist()] if data.classes else None
    # --eval_only after the run's own end writes the same step again: replace it, which add_embedding does with a
    # warning on stdout
    shutil.rmtree(os.path.join(writer.log_dir, f"{step:05d}", EMBEDDING_TAG), ignore_errors=True)
    writer.add_embedding(torch.cat(feats), metadata=labels, label_img=images.float() / 255, global_step=step,
                         tag=EMBEDDING_TAG)


class PretrainingTask(Task):
    """A pretraining job: its checkpoint is --model_path (MODEL-<suffix>.pth unless given), the encoder (the
    model's `encoder`) is watched by the kNN monitor every --knn_every epochs, and a finished run writes its
    test-set features for the projector and prints the command that fine-tunes it."""
    output_setting = "model_path"
    suffix = None  # the checkpoint's name ends in -<suffix>.pth
    feature = None  # the feature the kNN monitor reads, in words

    def __init__(self, args, ckpt, defaults):
        super().__init__(args, ckpt, defaults)
        self.labels_for = f"the kNN monitor (--knn_every {args.knn_every}; pass 0)" if args.knn_every else None

    @classmethod
    def output_path(cls, args):
        return args.model_path or f"{output_stem(args.model)}-{cls.suffix}.pth"

    def start(self, rt, data, model, trainer, log, steps, micro_batch):
        self.rt, self.data, self.model, self.log = rt, data, model, log
        self.knn_loaders = self.unaugmented_loaders(rt, data) if self.args.knn_every else None

    def unaugmented_loaders(self, rt, data):
        """The training and test sets, for the kNN monitor and evaluation."""
        return [self.eval_loader(rt, data.train_images, data.train_labels),
                self.eval_loader(rt, data.test_images, data.test_labels)]

    def knn(self, encoder, loaders, data, rt):
        """kNN accuracy of the encoder's pooled features with --knn_k and --knn_t, the training set as memory."""
        return knn_monitor(encoder, *loaders, len(data.classes), rt, k=self.args.knn_k, temperature=self.args.knn_t)

    def monitor(self, epoch, record, text):
        """The kNN accuracy when due after `epoch`, into the epoch's record and line. -> (record, text)"""
        if self.args.knn_every and epoch % self.args.knn_every == 0:
            record["knn_acc"] = self.knn(self.model.encoder, self.knn_loaders, self.data, self.rt)
            text += f", kNN {record['knn_acc']:.2%}"
        return record, text

    def finish(self, done):
        args = self.args
        if not (done and self.rt.is_main):
            return
        if args.embedding_images:
            write_embedding(self.log.writer, self.model.encoder, self.data, self.rt, args.embedding_images,
                            args.total_epoch)
        print(f"pretrained {args.model_path}; fine-tune it with: python {script_command(CLASSIFIER_SCRIPT)} "
              f"--pretrained_model_path {shlex.quote(args.model_path)}")

    # ---- --eval_only
    def report_saved(self, rt, ckpt, model, data):
        """kNN accuracy (with labels) and the job's own scores (saved_scores) in one line; then the encoder for timm
        (--export_timm), and the test-set features for the projector, in --log_dir or the run's own logs."""
        args, encoder = self.args, model.encoder
        loaders = self.unaugmented_loaders(rt, data)
        result = {"epoch": ckpt["epoch"], "knn_acc": self.knn(encoder, loaders, data, rt) if data.classes else None}
        scores = self.saved_scores(rt, model, loaders, result)
        if not rt.is_main:
            return result
        if result["knn_acc"] is not None:
            scores.insert(0, f"kNN accuracy {result['knn_acc']:.2%} (k {args.knn_k}, T {args.knn_t}, {self.feature}, "
                             "training set as memory)")
        print(f"{args.eval_only} (epoch {ckpt['epoch']}): {', '.join(scores)}")
        if args.export_timm:
            write_timm_state(*encoder_export(encoder, ckpt["model_config"]), args.export_timm)
        log_dir = args.log_dir or ckpt.get("args", {}).get("log_dir")
        if args.embedding_images and log_dir:
            from torch.utils.tensorboard import SummaryWriter
            with SummaryWriter(log_dir) as writer:
                write_embedding(writer, encoder, data, rt, args.embedding_images, ckpt["epoch"])
            print("the test-set features are in TensorBoard's projector: tensorboard --logdir "
                  f"{shlex.quote(log_dir)}", file=sys.stderr)
        return result

    def saved_scores(self, rt, model, loaders, result):
        """The job's own scores of a saved model (loaders: the unaugmented training and test sets), put into
        result. -> their text"""
        return []
