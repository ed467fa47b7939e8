"""ImageFolder trees (train/<class>/*.jpg) decoded once into uint8 tensors and cached beside the tree."""
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from cifar_mae.atomic import save_atomic
from cifar_mae.console import progress_bar
from cifar_mae.errors import UserError


def class_folders(directory):
    """An ImageFolder split's classes: its folders, sorted, hidden ones left out; none if it is no folder."""
    if not os.path.isdir(directory):
        return []
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def load_rgb(path):
    """An image file as an RGB PIL image; a file PIL cannot read is a UserError that names it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:
        raise UserError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None


def read_image(path, image_size):
    """An image file -> uint8 (3, image_size, image_size), resized (bicubic) when its size differs."""
    img = load_rgb(path)
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _visible_image(path, root):
    """An image file of an ImageFolder tree that is not hidden, nor inside a hidden folder (such as Jupyter's
    .ipynb_checkpoints/, or macOS's ._NAME.jpg copies, which hold no image)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    parts = path[len(root):].split(os.sep)  # ImageFolder joins root and the rest: no os.path.relpath per file
    return path.lower().endswith(IMG_EXTENSIONS) and not any(part.startswith(".") for part in parts)


def decode_folder(root, image_size):
    """Decode an ImageFolder tree once into uint8 tensors, cached beside it for later runs. Hidden files and
    folders are left out (_visible_image). _load_image_folders has checked that root holds class folders."""
    from torchvision.datasets import ImageFolder

    class VisibleImageFolder(ImageFolder):
        def find_classes(self, directory):
            names = class_folders(directory)
            return names, {name: i for i, name in enumerate(names)}

    folder = VisibleImageFolder(root, loader=load_rgb, is_valid_file=lambda path: _visible_image(path, root),
                                allow_empty=True)  # an empty class is named below, as torchvision does not
    counts = torch.bincount(torch.tensor(folder.targets, dtype=torch.int64), minlength=len(folder.classes))
    if (counts == 0).any():
        raise UserError(f"{root}: class folder {folder.classes[int((counts == 0).nonzero()[0])]!r} holds no images")
    return decode_samples(root, folder.samples, folder.classes, image_size)


def image_files(root):
    """The visible image files anywhere below root, sorted (unlabelled data: no class folders)."""
    found = (os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names)
    return sorted(path for path in found if _visible_image(path, root))


def decode_samples(root, samples, classes, image_size):
    """[(path, label)] below root -> uint8 images (N, 3, S, S), labels, readable class names; decoded once and
    cached beside root (decode_cache_paths)."""
    # the cache is keyed by the file list and sizes, so an edited tree is decoded again
    listing = [(p[len(root):].lstrip(os.sep), os.path.getsize(p)) for p, _ in samples]
    key = f"{image_size}:{hash_json(listing)}"
    caches = decode_cache_paths(root, image_size)
    for cache in filter(os.path.isfile, caches):
        try:
            cached = torch.load(cache, map_location="cpu", weights_only=True)
            if cached.get("key") == key:
                return cached["images"], cached["labels"], [readable_name(c) for c in cached["classes"]]
        except Exception:
            pass  # a broken cache is rebuilt
    images = torch.empty(len(samples), 3, image_size, image_size, dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:  # PIL decodes outside the GIL
        decoded = pool.map(lambda path: read_image(path, image_size), [path for path, _ in samples], chunksize=256)
        for i, image in enumerate(progress_bar(decoded, total=len(samples),
                                               desc=f"decoding {root} (once, then cached)")):
            images[i] = image
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    classes = [readable_name(c) for c in classes]
    entry = {"key": key, "images": images, "labels": labels, "classes": classes}
    try:
        save_atomic(entry, caches[0])
    except UserError as beside:  # a read-only dataset (shared on a cluster) or a full disk
        try:
            save_atomic(entry, caches[1])
            print(f"note: {beside}; cached in {caches[1]} instead", file=sys.stderr)
        except UserError as e:  # the run goes on without the cache
            print(f"note: {beside}; {e}; the next run decodes the images again", file=sys.stderr)
    return images, labels, classes


def hash_json(obj):
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]


def decode_cache_paths(root, image_size):
    """Where the decoded images of an ImageFolder split are cached: in .cache/ beside the split's folder, or,
    where that cannot be written (a read-only shared dataset), in the user's cache folder
    ($XDG_CACHE_HOME or ~/.cache, then cifar-mae/), under a name made from the split's absolute path."""
    root = os.path.abspath(root)
    name = f"{os.path.basename(root)}-{image_size}.pt"
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [os.path.join(os.path.dirname(root), ".cache", name),
            os.path.join(user_cache, "cifar-mae", f"{hash_json(root)}-{name}")]


def readable_name(name):
    """A file name as text that any UTF-8 output takes: bytes that are not UTF-8 (a folder unzipped from an
    archive made with another code page, which Python reads as lone surrogates) become backslash escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")
