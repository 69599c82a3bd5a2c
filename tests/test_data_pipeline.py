"""The ImageNet input pipeline: torchvision decode + transforms v2 on uint8, against the reference's PIL
pipeline; and `python -m benchmarks --suite data`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402

from benchmarks import data_pipeline, run  # noqa: E402
from supernet.data import (IMAGENET_MEAN, IMAGENET_STD, decode_rgb, imagefolder_splits, imagenet_transforms,  # noqa: E402
                           normalize_on_device)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    return data_pipeline.make_jpeg_folder(str(root), 64)


def first_file(folder):
    import os

    for directory, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            return os.path.join(directory, name)


def test_decode_matches_pil_and_reads_other_formats(jpeg_folder, tmp_path):
    path = first_file(jpeg_folder)
    decoded = decode_rgb(path)
    with Image.open(path) as image:
        reference = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    assert decoded.dtype == torch.uint8 and decoded.shape == reference.shape
    assert (decoded.int() - reference.int()).abs().max() <= 2  # two libjpeg builds may round an IDCT apart
    bmp = tmp_path / "image.bmp"
    Image.fromarray(reference.permute(1, 2, 0).numpy()).save(bmp)  # not a torchvision format: PIL fallback
    assert torch.equal(decode_rgb(str(bmp)), reference)


def test_evaluation_transform_follows_the_reference(jpeg_folder):
    path = first_file(jpeg_folder)
    batch = imagenet_transforms(224)[1](decode_rgb(path)).unsqueeze(0)
    assert batch.dtype == torch.uint8 and batch.shape == (1, 224, 224, 3)  # the bytes, channels last
    ours = normalize_on_device(batch)[0]
    bicubic = transforms.InterpolationMode.BICUBIC
    reference = transforms.Compose([transforms.Resize(256, interpolation=bicubic), transforms.CenterCrop(224),
                                    transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with Image.open(path) as image:
        expected = reference(image.convert("RGB"))
    assert ours.dtype == torch.float32 and ours.shape == expected.shape == (3, 224, 224)
    # torch's bicubic (a = -0.75, antialiased on uint8) and PIL's (a = -0.5) differ by a few grey levels
    assert (ours - expected).abs().mean() < 0.05


def test_training_split_gives_uint8_crops_normalised_on_the_device(jpeg_folder):
    import os
    import shutil

    root = os.path.dirname(jpeg_folder)
    if not os.path.isdir(os.path.join(root, "val")):
        shutil.copytree(jpeg_folder, os.path.join(root, "val"))
    splits = imagefolder_splits(root, 224)
    image, label = splits["train"][0]
    assert image.shape == (224, 224, 3) and image.dtype == torch.uint8 and label in (0, 1)
    batch = normalize_on_device(torch.stack([image, splits["train"][1][0]]))
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == torch.float32
    assert batch.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(batch[0], (image.permute(2, 0, 1).float() / 255 - mean) / std, atol=1e-5)


def test_data_suite_prints_the_comparison_line(jpeg_folder, tmp_path, capsys, monkeypatch):
    import os

    monkeypatch.setattr(data_pipeline, "WORKERS", (0, 2))
    rows = run.main(["--suite", "data", "--data-images", "64", "--data-root", os.path.dirname(jpeg_folder),
                     "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "data pipeline: " in printed and "reference pipeline: " in printed and "(2 workers)" in printed
    assert {(row["pipeline"], row["workers"]) for row in rows} == {(p, w) for p in ("pipeline", "reference")
                                                                   for w in (0, 2)}
    assert all(row["images_per_s"] > 0 and row["min"] <= row["images_per_s"] <= row["max"] for row in rows)
    assert json.load(open(tmp_path / "out" / "results.json"))["summary"].startswith("data pipeline: ")


def test_decode_on_device_reads_files_in_workers_and_decodes_in_to_device(jpeg_folder, tmp_path, monkeypatch):
    """The `decode_on_device` path, run on CPU: the same pixels as `decode_rgb` for JPEG and other
    formats, the training transforms after decoding, then a short training run through it."""
    import os
    import shutil

    import torchvision
    from torch.utils.data import DataLoader
    from torchvision.transforms import v2

    from supernet import data, train
    from supernet.config import resolve_config
    from supernet.evaluation import to_device

    root = tmp_path / "folder"
    shutil.copytree(jpeg_folder, root / "train")
    shutil.copytree(jpeg_folder, root / "val")
    png = root / "train" / sorted(os.listdir(root / "train"))[0] / "extra.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(png)
    encoded = data.EncodedImages(imagefolder_splits(str(root), 32)["train"], 32)
    paths = [path for path, _ in encoded.samples]
    index = {paths.index(str(png)), 0}
    batch, labels = encoded.collate([encoded[i] for i in sorted(index)])
    with monkeypatch.context() as patch:  # only a crop, to compare pixels
        patch.setattr(data, "_device_training_transform", lambda size: v2.CenterCrop(size))
        decoded = batch.decode(torch.device("cpu"))
        for image, i in zip(decoded, sorted(index)):
            assert torch.equal(image, v2.CenterCrop(32)(decode_rgb(paths[i])).permute(1, 2, 0))

        def rejected(*args, **kwargs):
            raise RuntimeError("nvJPEG: unsupported")
        patch.setattr(torchvision.io, "decode_jpeg", rejected)  # the batch falls back to the host decoder
        assert torch.equal(batch.decode(torch.device("cpu")), decoded)
    loader = DataLoader(encoded, batch_size=4, collate_fn=encoded.collate, num_workers=1)
    images, labels = to_device(*next(iter(loader)), torch.device("cpu"), channels_last=True)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.shape == (4,)
    assert images.is_contiguous(memory_format=torch.channels_last)
    config = resolve_config("digits", overrides={"dataset": "imagefolder", "data_path": str(root), "space": "tiny",
                                                 "image_size": "32", "decode_on_device": "true", "epochs": "1",
                                                 "batch_size": "8", "num_random_subnets": "1", "calib_images": "8",
                                                 "out": str(tmp_path / "run")})
    assert train.run_training(config, stop_at_step=2)["stopped"]
    with pytest.raises(ValueError, match="decode_on_device.*needs dataset imagefolder"):
        resolve_config("digits", overrides={"decode_on_device": "true"})


def test_usnets_augmentation_crops_jitters_and_adds_alexnet_lighting(jpeg_folder, tmp_path):
    """`augment usnets`: US-Nets' imagenet1k_mobile pipeline, uint8 [H, W, 3] as the other one; its
    lighting shift has AlexNet's per-channel spread (0-255 units)."""
    import shutil

    from supernet import data
    from supernet.config import resolve_config

    lighting = data.Lighting(0.1)
    flat = torch.full((3, 4, 4), 128, dtype=torch.uint8)
    torch.manual_seed(0)
    shifts = torch.stack([lighting(flat)[:, 0, 0].float() - 128 for _ in range(4000)])
    basis = torch.tensor(data.IMAGENET_EIGVEC) * torch.tensor(data.IMAGENET_EIGVAL)
    expected_std = 255 * 0.1 * basis.norm(dim=1)
    torch.testing.assert_close(shifts.std(0), expected_std, rtol=0.08, atol=0.6)
    assert shifts.mean(0).abs().max() < 0.5
    root = tmp_path / "folder"
    shutil.copytree(jpeg_folder, root / "train")
    shutil.copytree(jpeg_folder, root / "val")
    image, label = data.load_splits("imagefolder", str(root), 32, "usnets")["train"][0]
    assert image.shape == (32, 32, 3) and image.dtype == torch.uint8
    config = resolve_config("slim-imagenet-usnets", overrides={"data_path": str(root)})
    assert (config.augment, config.label_smoothing, config.grad_clip_value) == ("usnets", 0.0, 0.0)
    with pytest.raises(ValueError, match="decode_on_device"):
        resolve_config("slim-imagenet-usnets", overrides={"data_path": str(root), "decode_on_device": "true"})
