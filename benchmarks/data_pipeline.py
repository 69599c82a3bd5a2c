"""`python -m benchmarks --suite data`: training images per second of the ImageNet input pipeline.

A folder of JPEGs of ImageNet-like sizes (about 500x375 on average, smooth content with noise, JPEG
quality 90) is generated once; both pipelines read the same files in the same order through a
DataLoader (batches of 32; with workers, persistent, after one untimed pass so the timed pass sees
the steady state):

- `pipeline`: this project's (`supernet.data.imagenet_transforms` with `decode_rgb`): torchvision's
  JPEG decoder, transforms v2 on uint8 tensors (AutoAugment through PIL), uint8 batches. Their float
  conversion and normalisation (`normalize_on_device`) belong to the training step on the GPU and are
  not in the measurement; their cost on this CPU, for training without a GPU, is printed alongside;
- `reference`: the AlphaNet reference code's: a PIL decode, torchvision v1 RandomResizedCrop (bicubic),
  horizontal flip, AutoAugment (ImageNet policy), ToTensor and Normalize.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Dict, List

import torch
from torch.utils.data import DataLoader

DEFAULT_IMAGES = 300
WORKERS = (0, 1, 2)
BATCH = 32


def make_jpeg_folder(root: str, count: int, seed: int = 0) -> str:
    """`count` JPEGs in two class folders under root/train (reused when already there)."""
    import numpy as np
    from PIL import Image

    train = os.path.join(root, "train")
    existing = sum(len(files) for _, _, files in os.walk(train)) if os.path.isdir(train) else 0
    if existing == count:
        return train
    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = int(rng.integers(400, 601)), int(rng.integers(300, 451))
        coarse = rng.uniform(0, 255, size=(height // 16 + 1, width // 16 + 1, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, size=(height, width, 3))
        folder = os.path.join(train, f"class{index % 2}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{index:05d}.jpg"),
                                                                    quality=90)
    return train


def reference_training_transform(image_size: int):
    """The reference code's training transform, on PIL images."""
    from torchvision import transforms

    from supernet.data import IMAGENET_MEAN, IMAGENET_STD

    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.AutoAugment(transforms.AutoAugmentPolicy.IMAGENET),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def datasets_for(folder: str, image_size: int) -> Dict[str, torch.utils.data.Dataset]:
    from torchvision import datasets

    from supernet.data import decode_rgb, imagenet_transforms

    return {"pipeline": datasets.ImageFolder(folder, imagenet_transforms(image_size)[0], loader=decode_rgb),
            "reference": datasets.ImageFolder(folder, reference_training_transform(image_size))}


def images_per_second(dataset, workers: int) -> float:
    torch.manual_seed(0)
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=workers, persistent_workers=workers > 0)
    for _ in loader:  # warm-up pass: worker start-up, first-touch allocations
        pass
    began = time.perf_counter()
    count = sum(images.shape[0] for images, _ in loader)
    return count / (time.perf_counter() - began)


def normalize_ms_per_image(image_size: int) -> float:
    """What `normalize_on_device` costs per image on this CPU (one thread), for CPU-only training."""
    from supernet.data import normalize_on_device

    batch = torch.randint(0, 256, (BATCH, image_size, image_size, 3), dtype=torch.uint8)
    normalize_on_device(batch)
    began = time.perf_counter()
    for _ in range(10):
        normalize_on_device(batch)
    return (time.perf_counter() - began) / 10 / BATCH * 1e3


def run(root: str, count: int, image_size: int, rounds: int = 3) -> List[dict]:
    """Images/s of each pipeline and worker count, median of `rounds` rounds taking turns."""
    folder = make_jpeg_folder(root, count)
    sets = datasets_for(folder, image_size)
    threads = torch.get_num_threads()
    measured: Dict[tuple, List[float]] = {}
    try:
        torch.set_num_threads(1)  # as in DataLoader workers: one thread per process
        for _ in range(rounds):
            for workers in WORKERS:
                for name, dataset in sets.items():
                    measured.setdefault((name, workers), []).append(images_per_second(dataset, workers))
        normalize_ms = normalize_ms_per_image(image_size)
    finally:
        torch.set_num_threads(threads)
    return [{"pipeline": name, "workers": workers, "images_per_s": statistics.median(values),
             "min": min(values), "max": max(values), "normalize_ms_per_image": normalize_ms}
            for (name, workers), values in measured.items()]


def print_table(rows: List[dict]) -> str:
    print(f"{'pipeline':<10} {'workers':>7} {'images/s':>9} {'min':>7} {'max':>7}")
    for row in rows:
        print(f"{row['pipeline']:<10} {row['workers']:>7} {row['images_per_s']:>9.1f} {row['min']:>7.1f} "
              f"{row['max']:>7.1f}")
    by_key = {(row["pipeline"], row["workers"]): row["images_per_s"] for row in rows}
    ours, reference = by_key[("pipeline", 2)], by_key[("reference", 2)]
    line = f"data pipeline: {ours:.1f} images/s, reference pipeline: {reference:.1f} images/s (2 workers)"
    print(f"{ours / reference:.2f}x the reference with 2 workers; the uint8 batches' conversion and "
          f"normalisation (on the device) cost {rows[0]['normalize_ms_per_image']:.2f} ms per image on this CPU")
    print(line)
    return line
