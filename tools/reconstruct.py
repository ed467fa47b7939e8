"""Reconstructions of test images at several mask ratios from an MAE checkpoint, as one PNG.

    python tools/reconstruct.py vit-t-mae.pth --out reconstructions.png --mask_ratios 0.25 0.5 0.75

Each pixel is drawn as a 4 x 4 square (`--scale`), so 32-pixel images are large enough to see.

Rows are images; for each mask ratio two columns (masked input, reconstruction with the visible patches
pasted back), then the original.
"""
import os
import sys

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from model import MAE_ViT
from cifar_mae.atomic import write_atomic
from cifar_mae.augment import denormalize, normalize
from cifar_mae.checkpoint import load_checkpoint
from cifar_mae.datasets import load_data, spread_test_images
from cifar_mae.cli import cli_main
from cifar_mae.errors import UserError
from cifar_mae.flags import ArgumentParser, check_positive, path_arg
from cifar_mae.image_folders import read_image
from cifar_mae.outputs import check_writable
from cifar_mae.settings import data_dir_from


def get_args_parser():
    parser = ArgumentParser("MAE reconstructions at several mask ratios")
    parser.add_argument("checkpoint", type=path_arg,
                        help="an MAE pretraining checkpoint (mae_pretrain.py --model_path)")
    parser.add_argument("--out", type=path_arg, default="reconstructions.png",
                        help="the figure: a .png or .jpg file")
    parser.add_argument("--mask_ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                        help="one masked input + reconstruction column pair per ratio, each in [0, 1)")
    parser.add_argument("--images", type=path_arg, nargs="+", default=None, metavar="FILE",
                        help="image files to reconstruct (resized to the model's image size); default: test images")
    parser.add_argument("--num_images", type=int, default=8,
                        help="without --images: N test images spread over the classes")
    parser.add_argument("--data_dir", type=path_arg, default=None,
                        help="where the test images come from (as the scripts'); not given: the data the checkpoint "
                             "was trained on, where it is still there")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    parser.add_argument("--scale", type=int, default=4,
                        help="draw each pixel as a SCALE x SCALE square (nearest neighbour), so that 32-pixel "
                             "images are large enough to see; 1: the images' own size")
    return parser


@torch.no_grad()
def reconstruction_rows(model, images, mask_ratios, seed=0):
    """images (N, C, H, W) in [-1, 1] -> (N * (2 * len(ratios) + 1), C, H, W) in [0, 1], row by row."""
    model.eval()
    columns = []
    for ratio in mask_ratios:
        torch.manual_seed(seed)
        predicted, mask = model(images, mask_ratio=ratio)
        columns += [images * (1 - mask), model.reconstruct(images, predicted, mask)]
    columns.append(images)
    return denormalize(torch.stack(columns, dim=1).flatten(0, 1)), len(columns)


def labelled(grid, labels, height=14):
    """A grid image (C, H, W) in [0, 1] as a PIL image with a row of column labels above it."""
    body = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    figure = Image.new("RGB", (body.width, body.height + height), "white")
    figure.paste(body, (0, height))
    draw, column = ImageDraw.Draw(figure), body.width / len(labels)
    for i, label in enumerate(labels):
        draw.text((i * column + (column - draw.textlength(label)) / 2, 1), label, fill="black")
    return figure


@cli_main
def main(args):
    for ratio in args.mask_ratios:
        if not 0 <= ratio < 1:
            raise UserError(f"--mask_ratios must lie in [0, 1), got {ratio}")
    check_positive(args, "num_images", "scale")
    if os.path.splitext(args.out)[1].lower() not in (".png", ".jpg", ".jpeg"):
        raise UserError(f"--out {args.out}: give a .png or .jpg file name (the figure is an image)")
    check_writable(args.out, "--out")  # before any data is read
    ckpt = load_checkpoint(args.checkpoint, "mae_pretrain", "checkpoint")
    model = MAE_ViT(**ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    if args.images:
        images = normalize(torch.stack([read_image(path, model.config["image_size"])
                                        for path in args.images]))
    else:
        note = data_dir_from(args, ckpt, args.checkpoint)
        if note:
            print(note, file=sys.stderr)
        data = load_data(args.data_dir, model.config["image_size"])
        images = normalize(spread_test_images(data, args.num_images))
    grid, per_row = reconstruction_rows(model, images, args.mask_ratios, args.seed)
    grid = grid.repeat_interleave(args.scale, dim=-2).repeat_interleave(args.scale, dim=-1)
    labels = [f"{kind} {ratio:g}" for ratio in args.mask_ratios for kind in ("masked", "recon")] + ["original"]
    figure = labelled(make_grid(grid, nrow=per_row, padding=1, pad_value=1.0), labels)
    image_format = "png" if args.out.lower().endswith(".png") else "jpeg"
    write_atomic(args.out, lambda f: figure.save(f, format=image_format))
    print(f"wrote {args.out}: {len(images)} images x (masked, reconstruction) at mask ratios "
          f"{', '.join(map(str, args.mask_ratios))}, then the original")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
