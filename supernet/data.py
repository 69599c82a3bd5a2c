"""Datasets: scikit-learn's bundled digits (no download), CIFAR-10 and ImageFolder from local folders.

Each returns train / val / test splits. Digits uses a fixed 70/10/20 split, `digits_lowdata` the
same images split 10/10/80 (181 training images, 1437 test images: students limited by data, and a
test split on which one image is 0.07 points, not 0.28); CIFAR-10 (its python
batches, read directly) holds out 5000 training images (a tenth of smaller sets) as its validation
split and tests on its test batch; an ImageFolder root has train/ and val/ (and test/, else val
doubles as test).

ImageFolder uses the AlphaNet reference's ImageNet pipeline (`augment autoaugment`): training images
get a bicubic RandomResizedCrop to `image_size`, a horizontal flip and AutoAugment (torchvision's
ImageNet policy); or US-Nets' `imagenet1k_mobile` pipeline (`augment usnets`): a bilinear
RandomResizedCrop of scale (0.25, 1), colour jitter 0.4 (brightness, contrast, saturation), AlexNet's
PCA lighting noise of standard deviation 0.1 and a horizontal flip;
evaluation images are resized (bicubic) to `image_size * 256 / 224` on the short side and centre-
cropped to `image_size`. The model then resizes to each subnet's resolution. Files are decoded by
torchvision (`decode_rgb`) and transformed as uint8 tensors with transforms v2, converted to float
and normalised last; `python -m benchmarks --suite data` measures this against the reference's PIL
pipeline.
"""
from __future__ import annotations

import functools
import os
import pickle
from typing import Dict, List

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .config import DATASETS, DIGITS_SPLITS, is_bundled

SPLIT_SEED = 1234  # the splits never depend on the training seed
NUM_CLASSES = {"digits": 10, "digits_lowdata": 10, "cifar10": 10}


def digits_splits(dataset: str = "digits") -> Dict[str, Dataset]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32) / 16.0  # [N, 8, 8] in [0, 1]
    images = ((images - 0.5) / 0.5).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # 3 channels
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test_fraction, val_fraction = DIGITS_SPLITS[dataset]
    n_test, n_val = int(len(order) * test_fraction), int(len(order) * val_fraction)
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {name: TensorDataset(images[index], labels[index]) for name, index in parts.items()}


def _require_folder(path: str, what: str) -> None:
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: folder {path!r} does not exist")


class CifarBatches(Dataset):
    """CIFAR-10 images from its python batches (dicts with b"data" [N, 3072] uint8 and b"labels")."""

    def __init__(self, root: str, files, transform):
        images, labels = [], []
        for name in files:
            path = os.path.join(root, name)
            if not os.path.exists(path):
                raise FileNotFoundError(f"CIFAR-10: {path!r} is missing (expected the python batches "
                                        "data_batch_1..5 and test_batch, as extracted from cifar-10-python.tar.gz)")
            try:
                with open(path, "rb") as handle:
                    batch = pickle.load(handle, encoding="bytes")
                images.append(torch.as_tensor(batch[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
                labels.append(torch.as_tensor(batch[b"labels"], dtype=torch.long))
            except (pickle.UnpicklingError, KeyError, RuntimeError, EOFError, ValueError) as error:
                raise FileNotFoundError(f"CIFAR-10: {path!r} is malformed ({type(error).__name__}: {error})") from None
        self.images, self.labels, self.transform = torch.cat(images), torch.cat(labels), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(self.images[index].float() / 255.0), self.labels[index]


def cifar10_splits(root: str, image_size: int) -> Dict[str, Dataset]:
    from torchvision import transforms

    _require_folder(root, "CIFAR-10")
    folder = os.path.join(root, "cifar-10-batches-py")
    _require_folder(folder, f"CIFAR-10 needs cifar-10-batches-py/ under {root!r}")
    normalize = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    augment = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                  transforms.Resize(image_size, antialias=True), normalize])
    plain = transforms.Compose([transforms.Resize(image_size, antialias=True), normalize])
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    train_aug, train_plain = CifarBatches(folder, train_files, augment), CifarBatches(folder, train_files, plain)
    test = CifarBatches(folder, ["test_batch"], plain)
    held_out = min(5000, len(train_aug) // 10)
    order = torch.randperm(len(train_aug), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    return {"train": Subset(train_aug, order[held_out:]), "val": Subset(train_plain, order[:held_out]), "test": test}


IMAGENET_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)  # the reference's pixel mean and std
IMAGENET_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)


def decode_rgb(path: str) -> torch.Tensor:
    """A file's pixels as a uint8 [3, H, W] tensor: JPEG / PNG / WebP / GIF decoded by torchvision
    (libjpeg-turbo, no PIL image in between), other formats through PIL."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except RuntimeError:
        from PIL import Image
        from torchvision.transforms.v2.functional import pil_to_tensor

        with Image.open(path) as image:
            return pil_to_tensor(image.convert("RGB"))


AUGMENTATIONS = ("autoaugment", "usnets")
USNETS_CROP_SCALE, USNETS_JITTER, USNETS_LIGHTING = (0.25, 1.0), 0.4, 0.1
# ImageNet's RGB principal components (AlexNet's lighting noise), as US-Nets' utils/transforms.py
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


def imagenet_transforms(image_size: int, augment: str = "autoaugment"):
    """(training, evaluation) transforms of the reference's ImageNet pipeline (see the module doc), from
    `decode_rgb`'s uint8 tensors to uint8 [H, W, 3] tensors: the crop is cut before it is resized,
    AutoAugment runs on the crop through PIL's C operations (twice as fast as its tensor operations
    here), and float conversion and normalisation are left to `normalize_on_device`."""
    from torchvision.transforms import v2

    bicubic = v2.InterpolationMode.BICUBIC
    if augment == "usnets":
        training = v2.Compose([v2.RandomResizedCrop(image_size, scale=USNETS_CROP_SCALE, antialias=True),
                               v2.ColorJitter(USNETS_JITTER, USNETS_JITTER, USNETS_JITTER), Lighting(USNETS_LIGHTING),
                               v2.RandomHorizontalFlip(), channels_last_bytes])
    else:
        training = v2.Compose([
            v2.RandomResizedCrop(image_size, interpolation=bicubic, antialias=True), v2.RandomHorizontalFlip(),
            PILAutoAugment()])
    evaluation = v2.Compose([
        v2.Resize(int(image_size * 256 / 224), interpolation=bicubic, antialias=True), v2.CenterCrop(image_size),
        channels_last_bytes])
    return training, evaluation


class Lighting(torch.nn.Module):
    """AlexNet's lighting noise on a uint8 [3, H, W] image: every pixel shifted by sum_i alpha_i * eigval_i *
    eigvec_i with alpha ~ N(0, std^2), in 0-255 units (US-Nets adds it in 0-1 units to uint8 pixels,
    where the rounding leaves shifts of 0 or -1; the noise it means is this one)."""

    def __init__(self, std: float):
        super().__init__()
        self.std = std
        self.register_buffer("basis", torch.tensor(IMAGENET_EIGVEC) * torch.tensor(IMAGENET_EIGVAL))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        shift = self.basis @ (torch.randn(3) * self.std) * 255.0
        return (image.float() + shift[:, None, None]).round_().clamp_(0, 255).to(torch.uint8)


class PILAutoAugment(torch.nn.Module):
    """AutoAugment (ImageNet policy) of a uint8 [3, H, W] image through PIL, returned as the uint8
    [H, W, 3] bytes PIL holds (batches become channels-first on the device: no transpose back here)."""

    def __init__(self):
        super().__init__()
        from torchvision.transforms import v2

        self.augment = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        planes = [Image.fromarray(plane) for plane in image.numpy()]  # interleaved by PIL, no torch transpose
        return torch.from_numpy(np.array(self.augment(Image.merge("RGB", planes))))


def channels_last_bytes(image: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] as contiguous [H, W, 3]."""
    return image.permute(1, 2, 0).contiguous()


def normalize_on_device(images: torch.Tensor) -> torch.Tensor:
    """ImageFolder's uint8 [N, H, W, 3] batches as float32 [N, 3, H, W] (channels-last in memory)
    normalised with the reference's mean and std, where they are: on the GPU, after copying a quarter
    of the bytes float32 would take. Other batches are returned as they are."""
    if images.dtype != torch.uint8:
        return images
    mean, std = _normalization(images.device)
    return images.permute(0, 3, 1, 2).float().sub_(mean).div_(std)


@functools.lru_cache(maxsize=None)
def _normalization(device: torch.device):
    """The mean and std in 0-255 units, [3, 1, 1], made once per device (not copied there per batch)."""
    to_tensor = lambda values: torch.tensor(values, device=device).mul_(255).view(-1, 1, 1)  # noqa: E731
    return to_tensor(IMAGENET_MEAN), to_tensor(IMAGENET_STD)


class EncodedImages(Dataset):
    """An ImageFolder's training files as undecoded bytes (uint8 [size]) with their labels: the workers
    only read files, and `collate` batches them for `EncodedBatch.decode` on the device."""

    def __init__(self, folder: Dataset, image_size: int):
        self.samples, self.image_size = folder.samples, image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with open(path, "rb") as handle:
            return torch.frombuffer(bytearray(handle.read()), dtype=torch.uint8), label

    def collate(self, batch):
        """One flat byte tensor per batch (one shared-memory block from a worker, one pinned copy)."""
        files = [data for data, _ in batch]
        return (EncodedBatch(torch.cat(files), [len(data) for data in files], self.image_size),
                torch.tensor([label for _, label in batch]))


class EncodedBatch:
    """Still-encoded training images. `decode(device)` decodes the JPEGs there (nvJPEG on a GPU, through
    `torchvision.io.decode_jpeg(device=...)`; other formats, and any batch nvJPEG rejects, by
    `decode_image` on the host) and runs the training transforms there on each image's uint8 tensor:
    bicubic RandomResizedCrop, flip, AutoAugment (transforms v2's tensor operations, not PIL's).
    Returns uint8 [N, H, W, 3] (a view of [N, 3, H, W]) for `normalize_on_device`."""

    def __init__(self, data: torch.Tensor, sizes: List[int], image_size: int):
        self.data, self.sizes, self.image_size = data, sizes, image_size

    def __len__(self) -> int:
        return len(self.sizes)

    def pin_memory(self) -> "EncodedBatch":
        return EncodedBatch(self.data.pin_memory(), self.sizes, self.image_size)

    def decode(self, device: torch.device) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        files = self.data.split(self.sizes)
        is_jpeg = [data[:2].tolist() == [0xFF, 0xD8] for data in files]  # host bytes: no device sync
        images: List[torch.Tensor] = [None] * len(files)
        jpegs = [i for i, flag in enumerate(is_jpeg) if flag]
        if jpegs:
            try:
                decoded = decode_jpeg([files[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
                for i, image in zip(jpegs, decoded):
                    images[i] = image
            except RuntimeError:  # e.g. a CMYK JPEG on nvJPEG: this batch on the host
                pass
        augment = _device_training_transform(self.image_size)
        images = [augment(image if image is not None else
                          decode_image(data, mode=ImageReadMode.RGB).to(device, non_blocking=True))
                  for image, data in zip(images, files)]
        return torch.stack(images).permute(0, 2, 3, 1)


@functools.lru_cache(maxsize=None)
def _device_training_transform(image_size: int):
    from torchvision.transforms import v2

    bicubic = v2.InterpolationMode.BICUBIC
    return v2.Compose([v2.RandomResizedCrop(image_size, interpolation=bicubic, antialias=True),
                       v2.RandomHorizontalFlip(), v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)])


def imagefolder_splits(root: str, image_size: int, augment: str = "autoaugment") -> Dict[str, Dataset]:
    from torchvision import datasets

    _require_folder(root, "ImageFolder")
    for split in ("train", "val"):
        _require_folder(os.path.join(root, split), f"ImageFolder needs {split}/ under {root!r}")
    training, plain = imagenet_transforms(image_size, augment)
    splits = {"train": datasets.ImageFolder(os.path.join(root, "train"), training, loader=decode_rgb),
              "val": datasets.ImageFolder(os.path.join(root, "val"), plain, loader=decode_rgb)}
    test_root = os.path.join(root, "test")
    splits["test"] = (datasets.ImageFolder(test_root, plain, loader=decode_rgb) if os.path.isdir(test_root)
                      else splits["val"])
    return splits


def load_splits(dataset: str, data_path: str = "", image_size: int = 32,
                augment: str = "autoaugment") -> Dict[str, Dataset]:
    """train / val / test of a dataset; `augment` chooses the training augmentation of an ImageFolder."""
    if is_bundled(dataset):
        return digits_splits(dataset)
    if dataset == "cifar10":
        return cifar10_splits(data_path, image_size)
    if dataset == "imagefolder":
        return imagefolder_splits(data_path, image_size, augment)
    raise ValueError(f"unknown dataset {dataset!r}: choose {', '.join(DATASETS)}")


def config_splits(config) -> Dict[str, Dataset]:
    """The splits a training config names (its dataset, data folder, image size and augmentation)."""
    return load_splits(config.dataset, config.data_path, config.image_size, config.augment)


def num_classes(dataset: str, splits: Dict[str, Dataset]) -> int:
    if dataset in NUM_CLASSES:
        return NUM_CLASSES[dataset]
    return len(splits["train"].classes)
