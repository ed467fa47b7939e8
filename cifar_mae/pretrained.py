"""The encoder a classifier starts from (--pretrained_model_path): an MAE checkpoint of this project, or a plain
timm VisionTransformer state_dict (timm's model.state_dict(), --export_timm's file, official MAE's {"model": ...})."""
import os
import shlex

from timm.layers import resample_abs_pos_embed, resample_patch_embed

from cifar_mae.checkpoint import PRETRAINING, check_checkpoint, read_weights
from cifar_mae.console import script_command
from cifar_mae.errors import UserError
from cifar_mae.model_config import is_vil
from cifar_mae.settings import data_dir_from, take_saved

TIMM_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight")  # what a timm ViT's state_dict holds
VIL_KEYS = ("pos_embed.embed", "patch_embed.proj.weight", "blocks.0.rowwise_from_top_left.layer.proj_up.weight")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"mae_pretrain": ("MAE", "mae_pretrain.py"), "moco_pretrain": ("MoCo", "moco_pretrain.py")}


def plain_state_dict(weights, keys):
    """What torch.load gave, if it is a plain state_dict (or one wrapped in "model" or "state_dict") with these
    keys, else None."""
    if isinstance(weights, dict) and "format" not in weights:
        for wrapper in ("model", "state_dict"):  # official MAE and DeiT checkpoints; the ViL reference's
            if isinstance(weights.get(wrapper), dict):
                weights = weights[wrapper]
    return weights if isinstance(weights, dict) and all(k in weights for k in keys) else None


def timm_state_dict(weights):
    """What torch.load gave, if it is a plain timm VisionTransformer state_dict, else None."""
    return plain_state_dict(weights, TIMM_KEYS)


def read_pretrained(args, parser):
    """(--pretrained_model_path's checkpoint, a note on its data) or (None, None). An MAE checkpoint's settings
    become the run's defaults; a timm state_dict comes back as {"timm_state": weights} and fits --model's sizes.
    Read before the data, so a wrong path fails in a second."""
    path, what = args.pretrained_model_path, "--pretrained_model_path"
    if not path:
        return None, None
    weights = read_weights(path, what)
    state = timm_state_dict(weights)
    if state is not None:
        return {"timm_state": state}, None
    state = plain_state_dict(weights, VIL_KEYS)
    if state is not None:
        if not is_vil(args.model):
            raise UserError(f"{what} {path} is a Vision-LSTM state_dict: pass the --model (vil_...) and size flags "
                            "it fits")
        return {"vil_state": state}, None
    if not isinstance(weights, dict) or "format" not in weights:
        raise UserError(f"{what} {path} is neither a checkpoint of this project nor a timm VisionTransformer "
                        f"state_dict (with {', '.join(TIMM_KEYS)})")
    pretrained = check_checkpoint(weights, path, PRETRAINING, what)
    config = pretrained["model_config"]
    saved = {**config, "model": pretrained.get("args", {}).get("model", args.model)}  # its name, for file names
    take_saved(args, parser, saved, f"{what} {path}", fixed=config)
    return pretrained, data_dir_from(args, pretrained, path)


def resample_patch_projection(state, model, done):
    """The patch projection resampled (timm's resample_patch_embed) to the model's patch size where it differs.
    -> (state, done with what was resampled)"""
    proj, new_proj = state["patch_embed.proj.weight"], model.patch_embed.proj.weight
    if proj.shape[2:] != new_proj.shape[2:] and proj.shape[:2] == new_proj.shape[:2]:
        state["patch_embed.proj.weight"] = resample_patch_embed(proj, new_size=list(new_proj.shape[2:]))
        done.append(f"patch projection from {proj.shape[-1]} to {new_proj.shape[-1]} pixels a side")
    return state, done


def resampled_timm_state(state, model):
    """A timm state_dict with its position embedding and patch projection resampled (as timm does) to the
    model's patch grid and patch size where they differ. -> (state, what was resampled)."""
    state, done = dict(state), []
    pos, new_pos = state["pos_embed"], model.pos_embed
    if pos.shape[1] != new_pos.shape[1] and pos.shape[2] == new_pos.shape[2]:
        state["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size))
        done.append(f"position embedding from {pos.shape[1] - 1} to {new_pos.shape[1] - 1} patches")
    return resample_patch_projection(state, model, done)


def resampled_vil_state(state, model):
    """A Vision-LSTM state_dict with its position table and patch projection resampled (with timm's functions)
    to the model's patch grid and patch size where they differ. -> (state, what was resampled)."""
    state, done = {k: v for k, v in state.items() if not k.startswith(("head.", "legacy_norm."))}, []
    pos, grid = state["pos_embed.embed"], model.pos_embed.embed.shape[1:3]
    if pos.shape[1:3] != grid and pos.shape[-1] == model.pos_embed.embed.shape[-1]:
        flat = resample_abs_pos_embed(pos.flatten(1, 2), new_size=list(grid), old_size=list(pos.shape[1:3]),
                                      num_prefix_tokens=0)
        state["pos_embed.embed"] = flat.unflatten(1, grid)
        done.append(f"position embedding from {pos.shape[1]}x{pos.shape[2]} to {grid[0]}x{grid[1]} patches")
    return resample_patch_projection(state, model, done)


def load_encoder(model, pretrained, what):
    """Put the pretrained encoder's weights into a new classifier: every weight but the head's (and fc_norm's,
    with --global_pool) must come from it; its other weights (a decoder, a head) are left out."""
    if "timm_state" in pretrained:
        state, pretrained["resampled"] = resampled_timm_state(pretrained["timm_state"], model)
    elif "vil_state" in pretrained:
        state, pretrained["resampled"] = resampled_vil_state(pretrained["vil_state"], model)
    else:
        state = {model.backbone_prefix + k[len("encoder."):]: v for k, v in pretrained["model"].items()
                 if k.startswith("encoder.")}
    wanted = [k for k in model.state_dict() if not k.startswith(("head.", "fc_norm."))]
    missing = [k for k in wanted if k not in state]
    hint = "pass the --model and size flags it was trained with"
    if missing:
        raise UserError(f"{what} has no weights for {', '.join(missing[:2])}{' ...' if len(missing) > 2 else ''}: "
                        f"{hint}")
    extra = [k for k in state if k not in wanted] if "vil_state" in pretrained else []
    if extra:  # a Vision-LSTM's state_dict is taken whole, but for its head
        raise UserError(f"{what} has weights the model has no place for ({', '.join(extra[:2])}"
                        f"{' ...' if len(extra) > 2 else ''}): {hint}")
    try:
        model.load_state_dict({k: state[k] for k in wanted}, strict=False)
    except RuntimeError as e:  # sizes that differ: name the first
        lines = [line.strip() for line in str(e).splitlines() if line.strip().startswith("size mismatch")]
        raise UserError(f"{what} does not fit the model ({lines[0] if lines else e}): {hint}") from None


def pretraining_note(path, pretrained):
    """Which pretraining the encoder comes from; a run stopped before its schedule ended is pointed out."""
    if "timm_state" in pretrained or "vil_state" in pretrained:
        kind = "a timm VisionTransformer" if "timm_state" in pretrained else "a Vision-LSTM (VisionLSTM2)"
        resampled = "; ".join(pretrained.get("resampled") or [])
        return f"encoder from {path}: {kind} state_dict" + (f" (resampled: {resampled})" if resampled else "")
    if "converted_from" in pretrained:
        return f"encoder from {path}: converted from {pretrained['converted_from']}, whose epochs are not recorded"
    done, total = pretrained["epoch"], pretrained.get("args", {}).get("total_epoch")
    method, script = SCRIPTS[pretrained["kind"]]
    note = f"encoder from {path}: {method} pretraining after epoch {done}" + (f" of {total}" if total else "")
    if total and done < total:
        note += f" (an unfinished run: its learning rate had not yet decayed; resume it with python " \
                f"{script_command(os.path.join(ROOT, script))} --resume {shlex.quote(path)})"
    return note
