"""The one owner of the checkpoint format: every checkpoint is built by `make_checkpoint()` and read
by `load_checkpoint()`, a dict of state_dicts and plain values that loads with torch.load(weights_only=True)."""
import os
import pickle
import random
import sys

import numpy as np
import torch
import torch.distributed as dist

from cifar_mae.engine import EpochState
from cifar_mae.errors import UserError

FORMAT = "cifar-mae/2"  # bumped whenever what a checkpoint holds changes
KINDS = {"mae_pretrain": "an MAE pretraining", "moco_pretrain": "a MoCo pretraining", "classifier": "a classifier"}
PRETRAINING = ("mae_pretrain", "moco_pretrain")  # the kinds whose encoder a classifier starts from


def make_checkpoint(kind, model_state, model_config, epoch, **fields):
    """A checkpoint of `kind`: weights, the config that rebuilds their model, completed epochs, plain fields."""
    return {"format": FORMAT, "kind": kind, "model": model_state, "model_config": model_config, "epoch": epoch,
            **fields}


def evaluated_weights(ckpt, rt):
    """The weights a classifier's checkpoint is evaluated with: a NAME-last.pth training state's EMA when it kept
    one (said in a note), else its model's."""
    if "optimizer" not in ckpt:
        return ckpt["model"]
    ema = ckpt.get("ema") is not None
    if rt.is_main:
        print(f"note: this is a training state; evaluating its {'EMA' if ema else 'live'} weights after "
              f"epoch {ckpt['epoch']} (the best epoch's are in the file without -last)")
    return ckpt["ema"] if ema else ckpt["model"]


LEGACY_HELP = ("it is a whole pickled model (torch.save(model)) like the original repository wrote; loading it "
               "would run code stored in the file, so it is refused. If you trust the file, convert it once with "
               "`python tools/convert_legacy.py {path} converted.pth --execute_pickled_code`")


def load_checkpoint(path, kind=None, what="checkpoint"):
    """Load a checkpoint of this project with weights_only=True; a clear UserError for anything else."""
    return check_checkpoint(read_weights(path, what), path, kind, what)


def read_weights(path, what):
    """torch.load(path, weights_only=True) on the CPU; a clear UserError for a file that is not there, or that
    cannot be read (safely)."""
    if path and os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder, not a checkpoint file")
    if not path or not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):
            raise UserError(f"{what} {path}: " + LEGACY_HELP.format(path=path)) from None
        raise UserError(f"{what} {path} cannot be read safely: not a checkpoint of this project") from None
    except Exception:
        raise UserError(f"{what} {path} cannot be read: the file is truncated or not a PyTorch checkpoint") from None
    return ckpt


def check_checkpoint(ckpt, path, kind=None, what="checkpoint"):
    """What torch.load gave, if it is a checkpoint of this version of the project (of `kind`, or one of the kinds
    in a tuple); else a UserError."""
    if isinstance(ckpt, dict) and str(ckpt.get("format")).startswith("cifar-mae/") and ckpt["format"] != FORMAT:
        raise UserError(f"{what} {path} was written by an older version of this project ({ckpt['format']}, this "
                        f"one reads {FORMAT}); its run has to be done again with this version")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{what} {path} is not a checkpoint of this version of the project (no '{FORMAT}' "
                        "format tag)")
    kinds = (kind,) if isinstance(kind, str) else kind
    if kind is not None and ckpt.get("kind") not in kinds:
        raise UserError(f"{what} {path} is {KINDS.get(ckpt.get('kind'), repr(ckpt.get('kind')))} checkpoint, "
                        f"but {' or '.join(KINDS[k] for k in kinds)} checkpoint is needed here")
    return ckpt


def training_state(trainer, loader, rt, settings, epoch_state=None, data=None):
    """What --resume needs beyond the weights, as plain values and tensors (a collective under torchrun);
    settings: the run's, as plain_args gives them; data: the data_info of what the run trains on, which a resume
    compares (note_resumed_data)."""
    return {"data": data, "optimizer": trainer.optimizer.state_dict(),
            "scaler": trainer.scaler.state_dict() if trainer.scaler else None,
            "ema": trainer.ema.module.state_dict() if trainer.ema is not None else None,
            "epoch_state": epoch_state.state_dict(rt) if epoch_state is not None else None,
            "rng": rng_state(rt, loader), "args": settings, "world_size": rt.world_size}


def restore_training_state(ckpt, path, model, trainer, loader, rt, data):
    """Load what training_state saved (and the weights). -> (completed epochs, EpochState or None)."""
    if ckpt is None:
        return 0, None
    model.load_state_dict(ckpt["model"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    if trainer.scaler is not None and ckpt["scaler"]:
        trainer.scaler.load_state_dict(ckpt["scaler"])
    if trainer.ema is not None:
        trainer.ema.module.load_state_dict(ckpt["ema"])
    set_rng_state(ckpt["rng"], rt, loader)
    if rt.is_main:
        note_resumed_data(ckpt, data, path)
    saved, epoch_state = ckpt["epoch_state"], None
    if saved is not None:
        if len(saved["order"]) != loader.order.num_images:  # the epoch goes on through the same permutation
            raise UserError(f"the checkpoint was saved in the middle of an epoch over {len(saved['order'])} "
                            f"training images, and there are {loader.order.num_images} now: resume it on the data "
                            "it was trained on")
        sums = saved["sums"] if rt.rank == 0 else torch.zeros_like(saved["sums"])  # rank 0 holds all ranks' sums
        epoch_state = EpochState(saved["order"].to(rt.device), saved["step"], sums.to(rt.device))
    if rt.is_main:
        print(f"resumed {path} after epoch {ckpt['epoch']}" + (f" (+{epoch_state.step} steps)" if epoch_state else ""))
    return ckpt["epoch"], epoch_state


def note_resumed_data(ckpt, data, path):
    """A resumed run goes on with whatever --data_dir holds now; say so when those are other images than the
    ones it trained on (moving the same data elsewhere is fine: the fingerprint is of the pixels)."""
    saved = ckpt.get("data")
    if saved and data and saved["fingerprint"] != data["fingerprint"]:
        print(f"note: {data['dir']} holds other data than {path} was trained on ({saved['dir']}: fingerprint "
              f"{saved['fingerprint']}, now {data['fingerprint']}); the resumed epochs train on the data there now",
              file=sys.stderr)


def rng_state(rt, loader):
    """Every RNG stream a run draws from, as tensors and plain values; gathered from all ranks."""
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None,
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": [version, list(internal), gauss],
             "loader": loader.state_dict()}
    if rt.distributed:
        gathered = [None] * rt.world_size
        dist.all_gather_object(gathered, state)
        return gathered
    return [state]


def set_rng_state(states, rt, loader):
    if len(states) != rt.world_size:
        # the epochs' order is drawn alike on every rank, so it goes on; the per-rank streams cannot
        missed = loader.load_state_dict({"order": states[0]["loader"]["order"]})
        print(f"warning: the checkpoint holds RNG states of {len(states)} processes, this run has "
              f"{rt.world_size}; the order of the images goes on, the other random streams (augmentation, masks, "
              "dropout) start afresh", file=sys.stderr)
        note_missed_streams(missed, rt)
        return
    state = states[rt.rank]
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and rt.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], rt.device)
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    note_missed_streams(loader.load_state_dict(state["loader"]), rt)


def note_missed_streams(missed, rt):
    if missed and rt.is_main:
        print(f"warning: the data loader's random streams in the checkpoint ({', '.join(missed)}) come from a run "
              f"on another kind of device; they start afresh on {rt.device.type}, so from here on the order and "
              "augmentation of the images differ from an uninterrupted run's", file=sys.stderr)


def last_checkpoint_path(path):
    """Where the full training state lives beside a classifier's best-weights file: name-last.pth."""
    root, ext = os.path.splitext(path)
    return f"{root}-last{ext or '.pth'}"
