"""The run lifecycle every training job goes through, top to bottom: settings resolved once (settings.py), then
run(): outputs claimed, runtime, data, model, optimizer and trainer, resume, the epoch loop, the report.

A job is its flags plus a Task: what it trains (model, loss, loader, parameter groups), what it evaluates after
an epoch, what its checkpoint holds, and its closing report. The lifecycle calls a task's methods in this order:

    resolution:  default_checkpoint, take_defaults, check_args, output_path (on the settings, before the freeze)
    run:         build_model, train_loader, loss, param_groups, trainer_options, start,
                 then after_epoch and checkpoint every epoch, and finish
    --eval_only: check_eval_args, saved_model, then report_saved of a task made without a checkpoint to resume
"""
import sys

from cifar_mae.atomic import save_atomic
from cifar_mae.checkpoint import restore_training_state, training_state
from cifar_mae.console import format_rate, resume_command, script_command
from cifar_mae.datasets import data_info, load_data
from cifar_mae.engine import EpochClock, Trainer, checkpoint_due, stop_reason
from cifar_mae.loaders import make_loader
from cifar_mae.metrics import MetricsLog
from cifar_mae.optim import make_optimizer, param_groups, peak_lr, schedule
from cifar_mae.outputs import check_export_path, claim_outputs
from cifar_mae.runtime import note_devices, setup_runtime, split_batch, wrap_model
from cifar_mae.settings import plain_args, resolve_eval_settings, resolve_settings
from cifar_mae.stopping import StopRequest


class Task:
    """What a training job supplies to the lifecycle; one object per run, made from the resolved settings.

    Class attributes: kind (the checkpoint's kind), script (the script's file, for the commands a run prints),
    output_setting (the flag that names its checkpoint), build (model config -> the model),
    labels_for (what needs labels, for the error on unlabelled data; None: nothing), gpu_micro_batch (the
    micro-batch ceiling on a GPU without --max_device_batch_size), even_micro_batch (micro-batches of an even
    size: mixup pairs images), no_weight_decay (parameter names, besides biases and norms, without decay)."""
    kind = script = labels_for = output_setting = build = None
    gpu_micro_batch, even_micro_batch, no_weight_decay = 1024, False, ()

    def __init__(self, args, ckpt, defaults):
        """args: the frozen settings; ckpt: the checkpoint resumed, or None; defaults: take_defaults' result."""
        self.args, self.ckpt = args, ckpt

    # ---- settings: class methods on the args being resolved, in this order
    @classmethod
    def output_path(cls, args):
        """The checkpoint the run writes: the flag output_setting names, or the name the run gives it."""
        raise NotImplementedError

    @classmethod
    def default_checkpoint(cls, args):
        """The run's own resumable checkpoint, for --resume auto."""
        return cls.output_path(args)

    @classmethod
    def take_defaults(cls, args, parser, ckpt):
        """Defaults from another file (a pretrained encoder), when not resumed. -> what the task keeps of it."""
        return None

    @classmethod
    def check_args(cls, args):
        raise NotImplementedError

    # ---- the run
    def build_model(self, rt, data):
        raise NotImplementedError

    def train_loader(self, rt, data):
        raise NotImplementedError

    def loss(self, data):
        """loss_fn(model, images, labels) -> (mean loss, extra per-sample sums), as Trainer takes it."""
        raise NotImplementedError

    def param_groups(self, model):
        """The optimizer's groups: weight decay on weight matrices but those named in no_weight_decay, and the
        job's --layer_decay where it has one."""
        args = self.args
        return param_groups(model, args.weight_decay, self.no_weight_decay, getattr(args, "layer_decay", None))

    def loader_options(self):
        """make_loader's options that the common flags set."""
        args = self.args
        return dict(kind=args.loader, seed=args.seed, interpolation=args.interpolation, num_workers=args.num_workers)

    def eval_loader(self, rt, images, labels):
        """Unaugmented batches of 1024 in dataset order, for evaluation."""
        return make_loader(rt, images, labels, 1024, train=False, **self.loader_options())

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

    # ---- --eval_only
    @classmethod
    def check_eval_args(cls, args):
        """Checks of the settings an evaluation of a saved model reads (a class method: before the freeze)."""

    @classmethod
    def saved_model(cls, ckpt, rt):
        """The model a checkpoint of this kind holds (built by the class's `build`), with the weights its run
        evaluated (saved_weights)."""
        model = cls.build(ckpt["model_config"])
        model.load_state_dict(cls.saved_weights(ckpt, rt))
        return model

    @staticmethod
    def saved_weights(ckpt, rt):
        return ckpt["model"]

    def report_saved(self, rt, ckpt, model, data):
        """Evaluate the saved model on `data` and print what it scores (main process). -> the scores."""
        raise NotImplementedError


def claim_run_outputs(task, args, ckpt, restarting):
    """Before any data is read: the checkpoints (the one output_setting names and the resumable one, where that
    is another file), the log folder and any export can be written and are this run's; then they are locked."""
    path, resume_path = getattr(args, task.output_setting), task.default_checkpoint(args)
    beside = [resume_path] if resume_path != path else []
    check_export_path(args, run_outputs=(path, *beside), resumed_args=ckpt["args"] if ckpt is not None else None)
    claim_outputs(path, "--" + task.output_setting, args.log_dir, resume_path, resumed=bool(args.resume),
                  overwrite=args.overwrite, restarting=restarting, beside=beside)


def start_runtime(args):
    return setup_runtime(args.seed, args.device, args.amp, args.compile, args.compile_mode)


def evaluate_saved(task_class, args, parser):
    """--eval_only CHECKPOINT: the saved model at its own sizes, on the data its run used (or --data_dir), scored
    by the task. -> the scores."""
    args, ckpt, note = resolve_eval_settings(args, parser, task_class)
    check_export_path(args)
    rt = start_runtime(args)
    if rt.is_main and note:
        print(note, file=sys.stderr)
    model = task_class.saved_model(ckpt, rt).to(rt.device)
    data = load_data(args.data_dir, ckpt["model_config"]["image_size"], rt, labels_for=task_class.labels_for)
    return task_class(args, None, None).report_saved(rt, ckpt, model, data)


def run(task_class, args, parser):
    """Every job's main(args): resolve the settings, then train (or evaluate_saved with --eval_only).
    -> the task's result."""
    if args.eval_only:
        return evaluate_saved(task_class, args, parser)
    args, ckpt, restarting, defaults = resolve_settings(args, parser, task_class)
    task = task_class(args, ckpt, defaults)
    rt = start_runtime(args)  # seeds every RNG, so the model's initial weights repeat
    if rt.is_main:
        claim_run_outputs(task, args, ckpt, restarting)
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
    settings = plain_args(args)  # as runs.jsonl and each checkpoint keep them
    log = MetricsLog(args.log_dir, rt, settings, completed_epochs=start_epoch, resumed=ckpt is not None,
                     data=data_record)
    task.start(rt, data, model, trainer, log, len(loader), micro_batch)
    script = script_command(task.script)
    path = task.default_checkpoint(args)
    command = resume_command(script, path, rt, args.device)
    if rt.is_main:
        note_devices(rt, args.device, script)

    def save(epoch, epoch_state):
        state = training_state(trainer, loader, rt, settings, epoch_state, data_record)  # a collective
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
