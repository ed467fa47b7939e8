"""The run lifecycle every training job goes through, top to bottom: settings resolved once (resolve_settings),
then run(): outputs claimed, runtime, data, model, optimizer and trainer, resume, the epoch loop, the report.

A job is its flags plus a Task: what it trains (model, loss, loader, parameter groups), what it evaluates after
an epoch, what its checkpoint holds, and its closing report. The lifecycle calls a task's methods in this order:

    resolution:  default_checkpoint, take_defaults, check_args, name_outputs (on the settings, before the freeze)
    run:         claim_outputs, build_model, train_loader, loss, param_groups, trainer_options, start,
                 then after_epoch and checkpoint every epoch, and finish
    --eval_only: check_eval_args, saved_model, report_saved (evaluate_saved)
"""
import argparse
import sys

from cifar_mae.atomic import save_atomic
from cifar_mae.checkpoint import load_checkpoint, restore_training_state, resume_checkpoint, training_state
from cifar_mae.console import format_rate, resume_command, script_command
from cifar_mae.datasets import data_info, default_log_dir, load_data
from cifar_mae.engine import EpochClock, Trainer, checkpoint_due, stop_reason
from cifar_mae.flags import resolve_model, take_saved
from cifar_mae.metrics import MetricsLog
from cifar_mae.optim import make_optimizer, peak_lr, schedule
from cifar_mae.outputs import auto_resume, check_export_path, data_dir_from
from cifar_mae.runtime import note_devices, setup_runtime, split_batch, wrap_model
from cifar_mae.stopping import StopRequest


class Settings(argparse.Namespace):
    """A run's settings once resolved: the library reads them and never assigns to them."""

    def __init__(self, args):
        for key, value in vars(args).items():
            object.__setattr__(self, key, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"settings are resolved once, at the start of a run; {name} cannot change after that")


class Task:
    """What a training job supplies to the lifecycle; one object per run, made from the resolved settings.

    Class attributes: kind (the checkpoint's kind), script (the script's file, for the commands a run prints),
    labels_for (what needs labels, for the error on unlabelled data; None: nothing), gpu_micro_batch (the
    micro-batch ceiling on a GPU), even_micro_batch (micro-batches of an even size: mixup pairs images)."""
    kind = script = labels_for = None
    gpu_micro_batch, even_micro_batch = 1024, False

    def __init__(self, args, ckpt, defaults):
        """args: the frozen settings; ckpt: the checkpoint resumed, or None; defaults: take_defaults' result."""
        self.args, self.ckpt = args, ckpt

    # ---- settings: class methods on the args being resolved, in this order
    @classmethod
    def default_checkpoint(cls, args):
        """The run's own resumable checkpoint, for --resume auto."""
        raise NotImplementedError

    @classmethod
    def take_defaults(cls, args, parser, ckpt):
        """Defaults from another file (a pretrained encoder), when not resumed. -> what the task keeps of it."""
        return None

    @classmethod
    def check_args(cls, args):
        raise NotImplementedError

    @classmethod
    def name_outputs(cls, args):
        """Fill in the output paths not given. -> the checkpoint that names the log folder."""
        raise NotImplementedError

    # ---- the run
    def claim_outputs(self, restarting):
        """On the main process, before any data is read: every output can be written and is this run's."""
        raise NotImplementedError

    def build_model(self, rt, data):
        raise NotImplementedError

    def train_loader(self, rt, data):
        raise NotImplementedError

    def loss(self, data):
        """loss_fn(model, images, labels) -> (mean loss, extra per-sample sums), as Trainer takes it."""
        raise NotImplementedError

    def param_groups(self, model):
        raise NotImplementedError

    def trainer_options(self, model):
        """Keyword arguments of Trainer beyond the common ones (clip_grad, ema, num_extra) and AdamW's betas."""
        return {}, (0.9, 0.999)

    def start(self, rt, data, model, trainer, log, steps, micro_batch):
        """Everything the epochs need beyond the trainer; the start-up line on the main process (steps: optimizer
        steps per epoch)."""

    def after_epoch(self, epoch, metrics):
        """Evaluate and log finished epoch `epoch` (1-based). -> (metrics.jsonl record, text for its line)."""
        raise NotImplementedError

    def checkpoint(self, epoch, state):
        """The resumable checkpoint after `epoch` epochs, from the training state (training_state). -> dict."""
        raise NotImplementedError

    def finish(self, done):
        """The closing report (done: the schedule ran to its end). -> the job's result."""
        return None

    # ---- --eval_only: class methods
    @classmethod
    def check_eval_args(cls, args):
        """Checks of the settings an evaluation of a saved model reads."""

    @classmethod
    def saved_model(cls, ckpt, rt):
        """The model a checkpoint of this kind holds, with the weights its run evaluated."""
        raise NotImplementedError

    @classmethod
    def report_saved(cls, args, rt, ckpt, model, data):
        """Evaluate the saved model on `data` and print what it scores (main process). -> the scores."""
        raise NotImplementedError


def resolve_settings(args, parser, task):
    """Parse -> recipe file -> checkpoint defaults -> named size -> checks -> output names, once.
    -> (frozen Settings, the checkpoint resumed or None, whether --resume auto starts afresh, the task's defaults)"""
    restarting = auto_resume(args, task.default_checkpoint(args))
    ckpt = resume_checkpoint(args, parser, task.kind)
    defaults = task.take_defaults(args, parser, ckpt) if ckpt is None else None
    resolve_model(args)
    task.check_args(args)
    log_name = task.name_outputs(args)
    args.data_dir = args.data_dir or "data"
    args.log_dir = args.log_dir or default_log_dir(args.data_dir, log_name)
    return Settings(args), ckpt, restarting, defaults


def evaluate_saved(task_class, args, parser):
    """--eval_only CHECKPOINT: the saved model at its own sizes, on the data its run used (or --data_dir), scored
    by the task. -> the scores."""
    check_export_path(args)
    ckpt = load_checkpoint(args.eval_only, task_class.kind, "--eval_only")
    config = ckpt["model_config"]
    sizes = {k: v for k, v in config.items() if k != "mask_ratio"}  # an MAE is evaluated at --mask_ratio if given
    saved = {**config, "model": ckpt.get("args", {}).get("model", args.model)}  # its name, for its kind of model
    take_saved(args, parser, saved, f"--eval_only {args.eval_only}", fixed=sizes)
    resolve_model(args)
    task_class.check_eval_args(args)
    note = data_dir_from(args, ckpt, args.eval_only)
    args = Settings(args)
    rt = setup_runtime(args)
    if rt.is_main and note:
        print(note, file=sys.stderr)
    model = task_class.saved_model(ckpt, rt).to(rt.device)
    data = load_data(args.data_dir, config["image_size"], rt, labels_for=task_class.labels_for)
    return task_class.report_saved(args, rt, ckpt, model, data)


def run(task_class, args, parser):
    """Every job's main(args): resolve the settings, then train (or evaluate_saved with --eval_only).
    -> the task's result."""
    if args.eval_only:
        return evaluate_saved(task_class, args, parser)
    args, ckpt, restarting, defaults = resolve_settings(args, parser, task_class)
    task = task_class(args, ckpt, defaults)
    rt = setup_runtime(args)  # seeds every RNG, so the model's initial weights repeat
    if rt.is_main:
        task.claim_outputs(restarting)
    _, micro_batch = split_batch(args.batch_size, args.max_device_batch_size, rt, task.gpu_micro_batch,
                                 even=task.even_micro_batch)
    data = load_data(args.data_dir, args.image_size, rt, labels_for=task.labels_for)
    data_record = data_info(args.data_dir, data) if rt.is_main else None
    model = task.build_model(rt, data).to(rt.device)
    loader = task.train_loader(rt, data)
    options, betas = task.trainer_options(model)
    lr = peak_lr(args.base_learning_rate, args.batch_size)
    optimizer = make_optimizer(task.param_groups(model), lr, rt, betas, args.optimizer, args.momentum)
    trainer = Trainer(wrap_model(model, rt), task.loss(data), optimizer,
                      schedule(lr, args.warmup_epoch, args.total_epoch, len(loader)), rt,
                      micro_batch=micro_batch, skip_nonfinite=args.skip_nonfinite, **options)
    start_epoch, epoch_state = restore_training_state(ckpt, args.resume, model, trainer, loader, rt, data_record)
    log = MetricsLog(args.log_dir, rt, args, completed_epochs=start_epoch, resumed=ckpt is not None, data=data_record)
    task.start(rt, data, model, trainer, log, len(loader), micro_batch)
    script = script_command(task.script)
    path = task.default_checkpoint(args)
    command = resume_command(script, path, rt, args.device)
    if rt.is_main:
        note_devices(args, rt, script)

    def save(epoch, epoch_state):
        state = training_state(trainer, loader, rt, args, epoch_state, data_record)  # a collective
        if rt.is_main:
            save_atomic(task.checkpoint(epoch, state), path)

    clock = EpochClock(rt.started)
    if start_epoch >= args.total_epoch and rt.is_main:
        print(f"{args.resume} has finished all {args.total_epoch} epochs: nothing to train")
    done = True
    with StopRequest(announce=rt.is_main) as stop:
        for epoch in range(start_epoch, args.total_epoch):
            metrics, epoch_state = trainer.train_epoch(model, loader, epoch_state, epoch=epoch,
                                                       total_epoch=args.total_epoch, log_interval=args.log_interval,
                                                       stop=stop)
            if metrics is None:  # SIGINT / SIGTERM / SIGHUP: save where we are, exit 128 + signal
                save(epoch, epoch_state)
                log.close()
                if rt.is_main:
                    print(f"stopped; checkpoint saved to {path}. Resume with: {command}", file=sys.stderr)
                sys.exit(128 + stop.signum)
            epoch_state = None
            record, text = task.after_epoch(epoch + 1, metrics)
            record.update(epoch=epoch + 1, lr=metrics["lr"], images_per_s=metrics["images_per_s"],
                          seconds=metrics["seconds"])
            if trainer.compile_seconds is not None and epoch == start_epoch:
                record["compile_seconds"] = trainer.compile_seconds
                text += f", compile {trainer.compile_seconds:.1f}s"
            log.line(record)
            stopping = stop_reason(epoch + 1, args.total_epoch, clock, rt, args.stop_after_epoch,
                                   args.stop_after_minutes)
            if checkpoint_due(epoch + 1, args.save_every, args.total_epoch) or stopping:
                save(epoch + 1, None)
            clock.lap()
            if rt.is_main:
                print(f"epoch {epoch + 1}/{args.total_epoch}: {text}, {format_rate(metrics['images_per_s'])}"
                      + clock.left(args.total_epoch - epoch - 1))
            if stopping:
                if rt.is_main:
                    print(f"stopping after epoch {epoch + 1} {stopping}; resume with: {command}")
                done = False
                break
    result = task.finish(done)
    log.close()
    return result
