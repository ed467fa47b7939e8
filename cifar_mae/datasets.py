"""Finding and loading a whole dataset: CIFAR-10/100 batches or archives, ImageFolder trees, or a download."""
import contextlib
import hashlib
import json
import os
import pickle
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cifar_mae.errors import UserError
from cifar_mae.image_folders import class_folders, decode_folder, decode_samples, image_files, readable_name


@dataclass
class ImageData:
    """A whole dataset as uint8 tensors: train/test images (N, C, H, W), labels (N,) int64; classes [] for
    unlabelled images; `unlabelled`: images without labels beside the splits (STL-10's), for pretraining."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list
    unlabelled: torch.Tensor = None

    def pretraining_images(self, split="train+unlabeled"):
        """The images pretraining takes: the training split, the unlabelled images, or both (where there are)."""
        if self.unlabelled is None or split == "train":
            return self.train_images
        return self.unlabelled if split == "unlabeled" else torch.cat([self.unlabelled, self.train_images])


def load_data(data_dir, image_size, rt=None, labels_for=None):
    """CIFAR-10 or CIFAR-100 batches (cifar-10-batches-py/, cifar-100-python/), an ImageFolder tree (train/ and
    test/ or val/), a folder of unlabelled images (searched recursively; classes [], a held-out handful as the
    test split), or a download of CIFAR-10. labels_for: what needs labels, refused with unlabelled images.

    Under torchrun the first process of each machine downloads or decodes (and caches) first, and the others
    then read what it left: one decode per machine, whether or not the machines share a disk."""
    first = rt is None or not rt.distributed or rt.local_rank == 0
    if not first:
        dist.barrier()
    try:
        data = _find_and_load(data_dir, image_size, quiet=rt is not None and not rt.is_main)
    finally:
        if first and rt is not None and rt.distributed:
            dist.barrier()
    if labels_for and not data.classes:  # unlabelled images serve pretraining only
        raise UserError(f"--data_dir {data_dir} holds images without class folders, and {labels_for} needs labels: "
                        "train/<class>/ and test/<class>/ folders (or CIFAR's batches)")
    return data


def _data_kind(data_dir):
    """What load_data finds in data_dir: torchvision's CIFAR10 or CIFAR100 class (its folder, or the archive the
    CIFAR site serves), "folders", or None (download)."""
    from torchvision.datasets import CIFAR10, CIFAR100
    own = _own_cifar_folder(data_dir)
    if own is not None:
        return own
    for dataset in (CIFAR10, CIFAR100):  # cifar-10-batches-py/, cifar-100-python/
        if os.path.isdir(os.path.join(data_dir, dataset.base_folder)):
            return dataset
    if os.path.basename(os.path.abspath(data_dir)) == STL10_FOLDER or os.path.isdir(os.path.join(data_dir,
                                                                                                 STL10_FOLDER)):
        return "stl10"
    if os.path.isdir(os.path.join(data_dir, "train")):
        return "folders"
    for dataset in (CIFAR10, CIFAR100):  # cifar-10-python.tar.gz, cifar-100-python.tar.gz
        if os.path.isfile(os.path.join(data_dir, dataset.filename)):
            return dataset
    return None


def _own_cifar_folder(data_dir):
    """torchvision's CIFAR10 or CIFAR100 class when data_dir is its batches' own folder (cifar-10-batches-py/ or
    cifar-100-python/, which a root shared by both downloads holds side by side), else None."""
    from torchvision.datasets import CIFAR10, CIFAR100
    name = os.path.basename(os.path.abspath(data_dir))
    return next((d for d in (CIFAR10, CIFAR100) if d.base_folder == name and os.path.isdir(data_dir)), None)


def dataset_name(data_dir):
    """A short name of the data in data_dir, for default log folders: cifar10, cifar100 or the folder's name."""
    kind = _data_kind(data_dir)
    if kind == "folders" or kind is None and os.path.isdir(data_dir):  # an image tree, or unlabelled images
        return os.path.basename(os.path.abspath(data_dir)) or "images"
    if kind == "stl10":
        return "stl10"
    return "cifar100" if kind is not None and kind.__name__ == "CIFAR100" else "cifar10"


def default_log_dir(data_dir, model_path):
    """logs/<dataset>/<checkpoint's file name without .pth>: runs that write differently named checkpoints keep
    their logs apart (check_fresh_log_dir refuses to start a new run over another's logs)."""
    return os.path.join("logs", dataset_name(data_dir), os.path.splitext(os.path.basename(model_path))[0])


# the folders inside an ImageFolder tree that load_data reads (torchvision's CIFAR folders may be passed themselves)
DATASET_FOLDERS = ("train", "test", "val")


# archives a --data_dir may hold instead of a dataset (the CIFAR site's own are extracted, _download_cifar)
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip", ".tar.xz", ".tar.bz2", ".7z", ".rar")


def _find_and_load(data_dir, image_size, quiet=False):
    from torchvision.datasets import CIFAR10, CIFAR100
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):  # such as the archive itself
        raise UserError(f"--data_dir {data_dir} is a file, not a folder: pass the folder that holds the data")
    kind = _data_kind(data_dir)
    if kind == "stl10":
        return _load_stl10(data_dir, image_size)
    if kind == "folders":
        for test_name in ("test", "val"):
            if os.path.isdir(os.path.join(data_dir, test_name)):
                return _load_image_folders(data_dir, test_name, image_size)
        raise UserError(f"{data_dir} has train/ but neither test/ nor val/ beside it")
    if kind is None and os.path.isdir(data_dir):  # before a download into it, a folder that is not the dataset's:
        # one inside the dataset (an ImageFolder split such as train/, or one of its classes)
        inner = above = os.path.abspath(data_dir)
        for _ in range(2):
            inner, above = above, os.path.dirname(above)
            if os.path.basename(inner) in DATASET_FOLDERS and _data_kind(above) is not None:
                raise UserError(f"--data_dir {data_dir} is a folder inside the dataset; pass the folder that holds "
                                f"it: --data_dir {shlex.quote(above)}")
        # the folder above it, as the JPEG archive unpacks (hidden folders left out: another machine's download in
        # progress on a shared disk is one)
        inside = sorted(e.path for e in os.scandir(data_dir) if e.is_dir() and not e.name.startswith(".")
                        and _data_kind(e.path) is not None)
        if inside:
            raise UserError(f"--data_dir {data_dir} holds no dataset itself, but {inside[0]} does: pass "
                            f"--data_dir {shlex.quote(inside[0])}")
        packed = sorted(name for name in os.listdir(data_dir) if name.lower().endswith(ARCHIVE_SUFFIXES))
        if packed:  # such as the JPEG copy of CIFAR-10, cifar10-jpeg.tar.gz: meant to be used, not downloaded over
            archive, into = shlex.quote(os.path.join(data_dir, packed[0])), shlex.quote(data_dir)
            raise UserError(f"--data_dir {data_dir} holds no dataset, only the archive {packed[0]}: unpack it (for a "
                            f".tar.gz: tar -xzf {archive} -C {into}) and pass the folder that holds train/ and test/ "
                            "(or cifar-10-batches-py/)")
        files = image_files(data_dir)
        if files:  # images without class folders or splits: unlabelled, for pretraining
            return _load_unlabelled(data_dir, files, image_size)
    kind = kind or CIFAR10
    if _own_cifar_folder(data_dir):
        return _load_cifar_batches(os.path.dirname(os.path.abspath(data_dir)), image_size, kind)
    if not os.path.isdir(os.path.join(data_dir, kind.base_folder)):
        _download_cifar(data_dir, kind)
    elif kind is CIFAR10 and os.path.isdir(os.path.join(data_dir, CIFAR100.base_folder)) and not quiet:
        # torchvision downloads both into one root: CIFAR-10 is the default, CIFAR-100 is one flag away
        print(f"note: {data_dir} holds CIFAR-10 and CIFAR-100; this is CIFAR-10 (for CIFAR-100 pass --data_dir "
              f"{shlex.quote(os.path.join(data_dir, CIFAR100.base_folder))})", file=sys.stderr)
    return _load_cifar_batches(data_dir, image_size, kind)


def _download_cifar(data_dir, dataset=None):
    """torchvision's CIFAR-10 (or `dataset`: CIFAR10 or CIFAR100) into a temporary folder, moved into place only
    when complete: extracted from the archive the CIFAR site serves when data_dir holds it (its md5 checked),
    else downloaded."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity, extract_archive
    dataset = dataset or CIFAR10
    archive = os.path.join(data_dir, dataset.filename)
    from_archive = os.path.isfile(archive)  # else a download
    if from_archive and not check_integrity(archive, dataset.tgz_md5):
        raise UserError(f"{archive} is not the archive the CIFAR site serves (its md5 differs: a download that "
                        "stopped part way?); delete it or fetch it again")
    looked = (f"no CIFAR-10 in {os.path.abspath(data_dir)} (looked for cifar-10-batches-py/, cifar-100-python/, "
              "train/ with test/ or val/ class folders, and the archives cifar-10-python.tar.gz and "
              "cifar-100-python.tar.gz)")
    target = os.path.join(data_dir, dataset.base_folder)
    tmp, created, path = None, None, os.path.abspath(data_dir)
    while not os.path.exists(path):  # the outermost folder this creates
        created, path = path, os.path.dirname(path)
    try:
        os.makedirs(data_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".cifar-download-", dir=data_dir)  # beside the target: one atomic rename
        if from_archive:  # its md5 was checked above
            print(f"extracting {archive} (once) ...", file=sys.stderr)
            extract_archive(archive, tmp)
        else:
            print(f"{looked}; downloading CIFAR-10 with torchvision ...", file=sys.stderr)
            with contextlib.redirect_stdout(sys.stderr):
                dataset(tmp, train=True, download=True)
        try:
            os.rename(os.path.join(tmp, dataset.base_folder), target)
        except OSError:
            if not os.path.isdir(target):  # else another process (another machine on a shared disk) was first
                raise
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        what = f"extracting {archive}" if from_archive else f"{looked}, and downloading it"
        raise UserError(f"{what} failed ({reason}); pass --data_dir with a folder holding cifar-10-batches-py/, "
                        "cifar-100-python/ or train/ + test/ image folders (see docs/data.md)") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if created is not None and not any(files for _, _, files in os.walk(created)):
            shutil.rmtree(created, ignore_errors=True)  # a failed download leaves no empty folders behind


def _resize(images, image_size):
    """uint8 (N, C, h, w) -> uint8 (N, C, image_size, image_size); a no-op at the same size."""
    if images.shape[-1] == image_size and images.shape[-2] == image_size:
        return images
    out = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def _load_image_folders(data_dir, test_name, image_size):
    train_root, test_root = os.path.join(data_dir, "train"), os.path.join(data_dir, test_name)
    train_classes, test_classes = class_folders(train_root), class_folders(test_root)
    for root, classes in ((train_root, train_classes), (test_root, test_classes)):  # before decoding anything
        if not classes:  # torchvision's own error for this is a ValueError about class_to_index
            raise UserError(f"{root} holds no class folders (an ImageFolder tree has one folder of images per "
                            "class)")
    if train_classes != test_classes:
        def only(a, b):  # up to 3 names of a that b lacks
            names = sorted(set(a) - set(b))
            return ", ".join(map(readable_name, names[:3])) + (", ..." if len(names) > 3 else "") or "-"
        raise UserError(f"the class folders of {train_root} ({len(train_classes)}) and {test_root} "
                        f"({len(test_classes)}) differ: only in {test_name}/: {only(test_classes, train_classes)}; "
                        f"only in train/: {only(train_classes, test_classes)} (both need one folder of images "
                        "per class, with the same names; a split laid out otherwise, such as Tiny-ImageNet's "
                        "val/images/ with val_annotations.txt, needs sorting into class folders first)")
    train = decode_folder(train_root, image_size)
    test = decode_folder(test_root, image_size)
    return ImageData(train[0], train[1], test[0], test[1], classes=train[2])


STL10_FOLDER = "stl10_binary"  # torchvision's STL10 layout: train_X.bin, train_y.bin, test_*, unlabeled_X.bin


def _load_stl10(data_dir, image_size):
    """STL-10's binary files (torchvision's reader, without its md5 checks): train and test with labels, and the
    100,000 unlabelled images where unlabeled_X.bin is there."""
    from torchvision.datasets import STL10
    root = os.path.dirname(os.path.abspath(data_dir)) if os.path.basename(os.path.abspath(data_dir)) == \
        STL10_FOLDER else data_dir
    folder = os.path.join(root, STL10_FOLDER)
    needed = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", STL10.class_names_file]
    missing = [name for name in needed if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise UserError(f"{folder} is incomplete: missing {', '.join(missing)}")

    class LocalSTL10(STL10):
        def _check_integrity(self):
            return True

    def split(name):
        try:
            ds = LocalSTL10(root, split=name)
        except ValueError:  # a file whose size is no whole number of 96 x 96 images
            raise UserError(f"cannot read {folder}'s {name} files: truncated or not STL-10's binary format") from None
        images = _resize(torch.from_numpy(ds.data).contiguous(), image_size)
        return images, torch.from_numpy(ds.labels.astype(np.int64)), ds.classes

    train_images, train_labels, classes = split("train")
    test_images, test_labels, _ = split("test")
    unlabelled = split("unlabeled")[0] if os.path.isfile(os.path.join(folder, "unlabeled_X.bin")) else None
    return ImageData(train_images, train_labels, test_images, test_labels, classes, unlabelled)


def _load_unlabelled(data_dir, files, image_size):
    """Images without labels (classes []): all for training but a fixed held-out handful, the reconstruction
    images, in place of a test split."""
    images, labels, _ = decode_samples(data_dir, [(path, 0) for path in files], [], image_size)
    if len(images) < 4:
        raise UserError(f"--data_dir {data_dir} holds {len(images)} image(s); pretraining needs a few more")
    kept, held = holdout_split(len(images), min(16, len(images) // 4))
    return ImageData(images[kept], labels[kept], images[held], labels[held], classes=[])


def _load_cifar_batches(data_dir, image_size, dataset):
    """torchvision's CIFAR10 or CIFAR100 files (the pickled batches its download writes) as uint8 tensors."""

    class LocalCIFAR(dataset):
        """torchvision's reader without its md5 checks, so subsets and copies of the batches load too."""

        def _check_integrity(self):
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, name))
                       for name, _ in self.train_list + self.test_list)

        def _load_meta(self):
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(path, "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]

    folder = os.path.join(data_dir, dataset.base_folder)
    splits = []
    for train in (True, False):
        try:
            ds = LocalCIFAR(data_dir, train=train)
        except RuntimeError:
            missing = [n for n, _ in dataset.train_list + dataset.test_list + [(dataset.meta["filename"], 0)]
                       if not os.path.isfile(os.path.join(folder, n))]
            raise UserError(f"{folder} is incomplete: missing {', '.join(missing)}") from None
        except Exception:
            split_list = dataset.train_list if train else dataset.test_list
            bad = _first_unreadable_pickle(folder, [n for n, _ in split_list] + [dataset.meta["filename"]])
            raise UserError(f"cannot read {bad}: the file is corrupt or truncated") from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        splits += [_resize(images, image_size), torch.tensor(ds.targets, dtype=torch.int64)]
    return ImageData(*splits, classes=list(ds.classes))


def _first_unreadable_pickle(folder, names):
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            if name.endswith("meta"):
                continue
            np.asarray(entry["data"]).reshape(-1, 3, 32, 32)
            assert len(entry["labels"] if "labels" in entry else entry["fine_labels"]) == len(entry["data"])
        except Exception:
            return path
    return folder


def holdout_split(num_images, size, seed=0):
    """Indexes (kept, held_out) that set `size` of `num_images` training images aside, both sorted.

    The split depends on `seed` only (not on a run's --seed), so runs with different seeds pick their best
    epoch on the same held-out images."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return order[size:].sort().values, order[:size].sort().values


def spread_test_indexes(data, count=16):
    """The indexes of `count` test images spread over the classes (the i-th of each class in turn), the same in
    every run."""
    if not data.classes:  # unlabelled: the held-out images as they are
        return torch.arange(min(count, len(data.test_images)))
    by_class = [torch.nonzero(data.test_labels == c)[:, 0] for c in range(len(data.classes))]
    order = torch.stack([ids[i] for i in range(max(map(len, by_class))) for ids in by_class if i < len(ids)])
    return order[:count]


def spread_test_images(data, count=16):
    return data.test_images[spread_test_indexes(data, count)]


def data_info(data_dir, data):
    """Where the data came from, its sizes, and a fingerprint of its decoded pixels, labels and class names:
    equal for equal data whatever the files' format, so two runs can tell whether they trained on the same
    images (the JPEG copy of CIFAR-10 and the original batches differ)."""
    digest = hashlib.blake2b(digest_size=8)
    for tensor in (data.train_images, data.train_labels, data.test_images, data.test_labels):
        digest.update(tensor.cpu().contiguous().numpy())
    digest.update(json.dumps(list(data.classes)).encode())
    return {"dir": os.path.abspath(data_dir), "name": dataset_name(data_dir), "train_images": len(data.train_images),
            "test_images": len(data.test_images), "classes": len(data.classes), "fingerprint": digest.hexdigest()}
