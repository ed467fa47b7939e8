"""Convert a whole pickled model from the original repository (torch.save(model)) to this project's format.

    python tools/convert_legacy.py old-vit-t-mae.pt vit-t-mae.pth --execute_pickled_code

Loading such a file runs code stored in it (that is how pickle rebuilds a module), so this tool refuses
unless --execute_pickled_code is given: use it only on files you trust. A plain state_dict with the
original's names (torch.save(model.state_dict())) loads safely and needs no flag. The result is a plain state_dict
checkpoint that loads with weights_only=True. An MAE_ViT becomes a pretraining checkpoint, a
ViT_Classifier a classifier checkpoint. The original's layer norms used eps 1e-5 (ours 1e-6) and its decoder
had no final norm (ours is set to identity-like weights 1, 0), so a converted decoder is close, not exact;
the encoder, which fine-tuning uses, carries over weight for weight. A pickled model knows its attention
head counts; a state_dict does not record them, so they are taken as width / 64 (the original's 3 for ViT-T/2)
unless --encoder_head / --decoder_head give them: the weights fit either way, but compute differently.
"""
import os

import torch

from model import check_config
from cifar_mae.atomic import save_atomic
from cifar_mae.checkpoint import make_checkpoint
from cifar_mae.cli import cli_main
from cifar_mae.errors import UserError, as_user_error
from cifar_mae.flags import ArgumentParser, path_arg
from cifar_mae.outputs import check_new_file

# original name -> ours; pos_embedding tensors are (T, 1, D) there, (1, 1 + T, D) here
RENAMES = [("patchify.", "patch_embed.proj."), ("transformer.", "blocks."), ("layer_norm.", "norm.")]


def convert_state_dict(state):
    """The original repository's parameter names and shapes -> this project's (an MAE_ViT or classifier)."""
    out = {}
    for key, value in state.items():
        prefix = next((p for p in ("encoder.", "decoder.") if key.startswith(p)), "")
        name = key[len(prefix):]
        for old, new in RENAMES:
            if name.startswith(old):
                name = new + name[len(old):]
        if name == "pos_embedding":
            table = value.permute(1, 0, 2)  # (1, T or 1 + T, D)
            if prefix != "decoder.":  # encoder / classifier: the cls token had no position there
                table = torch.cat([torch.zeros_like(table[:, :1]), table], dim=1)
            name, value = "pos_embed", table
        out[prefix + name] = value
    if any(k.startswith("decoder.") for k in out) and "decoder.decoder_embed.weight" not in out:
        width = out["decoder.mask_token"].shape[-1]
        out["decoder.decoder_embed.weight"] = torch.eye(width)
        out["decoder.decoder_embed.bias"] = torch.zeros(width)
        out["decoder.norm.weight"] = torch.ones(width)
        out["decoder.norm.bias"] = torch.zeros(width)
    return out


def model_config(state, encoder_head=None, decoder_head=None):
    """Sizes read off the weights; the head counts, which weights do not record, as given or width / 64."""
    prefix = "encoder." if "encoder.cls_token" in state else ""
    emb_dim = state[prefix + "cls_token"].shape[-1]
    patch = state[prefix + "patch_embed.proj.weight"].shape[-1]
    tokens = state[prefix + "pos_embed"].shape[1] - 1
    blocks = lambda p: len({k.split(".")[1 + p.count(".")] for k in state if k.startswith(p + "blocks.")})
    config = dict(image_size=int(round(tokens ** 0.5)) * patch, patch_size=patch, emb_dim=emb_dim,
                  in_chans=state[prefix + "patch_embed.proj.weight"].shape[1], pos_embed="learned")
    heads = lambda given, width: given or max(1, width // 64)  # the original's ViT-T: 3 heads of 64
    if prefix:
        dec_dim = state["decoder.mask_token"].shape[-1]
        config.update(encoder_layer=blocks("encoder."), encoder_head=heads(encoder_head, emb_dim),
                      decoder_layer=blocks("decoder."), decoder_head=heads(decoder_head, dec_dim), mask_ratio=0.75,
                      decoder_emb_dim=dec_dim, norm_pix_loss=False)
    else:
        config.update(encoder_layer=blocks(""), encoder_head=heads(encoder_head, emb_dim),
                      num_classes=state["head.weight"].shape[0], global_pool=False, linear_probe=False)
    return config


def first_block_heads(part):
    """The head count of a pickled model part's first attention block, or None."""
    blocks = getattr(part, "transformer", None) or getattr(part, "blocks", None)
    return getattr(getattr(blocks[0], "attn", None), "num_heads", None) if blocks else None


def get_args_parser():
    parser = ArgumentParser("convert a legacy whole-model pickle")
    parser.add_argument("source", type=path_arg,
                        help="the original repository's torch.save(model) file, or a state_dict")
    parser.add_argument("destination", type=path_arg,
                        help="this project's checkpoint to write (weights_only loadable)")
    parser.add_argument("--execute_pickled_code", action="store_true",
                        help="required for a whole pickled model: loading it runs code stored in it; only for "
                             "files you trust")
    parser.add_argument("--encoder_head", type=int, default=None,
                        help="attention heads of the encoder; a state_dict does not record them (a pickled model "
                             "does); none: width / 64, the original's 3 for ViT-T")
    parser.add_argument("--decoder_head", type=int, default=None, help="the same for the decoder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    return parser


def safe_load(path):
    """What torch.load(weights_only=True) gives, or None when the file needs pickled code (a whole model)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None


@cli_main
def main(args):
    if not os.path.isfile(args.source):
        raise UserError(f"{args.source} does not exist")
    check_new_file(args.destination, "destination", args.overwrite)
    plain = safe_load(args.source)
    if isinstance(plain, dict) and "format" in plain:
        raise UserError(f"{args.source} is already a {plain.get('kind', '')} checkpoint of this project "
                        "(it loads with weights_only=True); there is nothing to convert")
    if isinstance(plain, dict) and plain and all(torch.is_tensor(v) for v in plain.values()):
        module = None  # a state_dict: tensors only, no code ran
        state = convert_state_dict(plain)
    elif plain is not None:
        raise UserError(f"{args.source} holds a {type(plain).__name__}, not a model or a state_dict")
    elif not args.execute_pickled_code:
        raise UserError("loading a pickled model runs code stored in the file; pass --execute_pickled_code "
                        "if you trust it")
    else:
        module = torch.load(args.source, map_location="cpu", weights_only=False)
        if not isinstance(module, torch.nn.Module):
            raise UserError(f"{args.source} holds a {type(module).__name__}, not a pickled model")
        state = convert_state_dict(module.state_dict())
    heads = [args.encoder_head, args.decoder_head]
    if module is not None:  # a pickled model knows its head counts
        heads = [heads[0] or first_block_heads(getattr(module, "encoder", module)),
                 heads[1] or first_block_heads(getattr(module, "decoder", None))]
    guessed = module is None and not all(heads)
    try:
        config = getattr(module, "config", None) or model_config(state, *heads)  # our own classes carry theirs
    except (KeyError, IndexError):
        raise UserError(f"{args.source} does not hold the original repository's MAE_ViT or ViT_Classifier "
                        "weights (no cls_token / patchify / pos_embedding found)") from None
    kind = "mae_pretrain" if "encoder.cls_token" in state else "classifier"
    parts = ["encoder", "decoder"] if kind == "mae_pretrain" else ["encoder"]
    with as_user_error(suffix=" (--encoder_head / --decoder_head)"):
        check_config(config["image_size"], config["patch_size"],
                     {part: config["emb_dim" if part == "encoder" else "decoder_emb_dim"] for part in parts},
                     {part: config[f"{part}_head"] for part in parts})
    save_atomic(make_checkpoint(kind, state, config, 0, converted_from=os.path.basename(args.source)), args.destination)
    heads_line = ", ".join(f"{config[f'{part}_head']} {part} heads" for part in parts)
    print(f"wrote {args.destination} ({kind} checkpoint, {heads_line}); it loads with weights_only=True")
    if guessed:
        print("note: a state_dict does not record head counts; those not given were taken as width / 64 (the "
              "original's 3 for ViT-T/2). If the original used others, convert again with --encoder_head / "
              "--decoder_head --overwrite: the weights load either way, but compute differently")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
