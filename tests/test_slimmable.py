"""Slimmable MobileNetV1 / V2 spaces: US-Nets widths, published FLOPs, extraction, the per-width table."""
from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

import alphadiv_kernels as ak
from supernet import cli, train
from supernet.config import resolve_config
from supernet.evaluate import parse_widths
from supernet.flops import count_with_hooks, flops_and_params
from supernet.model import ElasticSupernet, StaticMBConv, extract
from supernet.space import make_divisible
from supernet.space import (PUBLISHED_WIDTHS, SLIM_MBV1, SLIM_MBV1_DIGITS, SLIM_MBV2, SLIM_MBV2_DIGITS, SPACES,
                            TINY)

SLIM_SPACES = [SLIM_MBV1, SLIM_MBV2, SLIM_MBV1_DIGITS, SLIM_MBV2_DIGITS]
DIGITS_SPACES = [SLIM_MBV1_DIGITS, SLIM_MBV2_DIGITS]


@pytest.mark.parametrize("space_name,width", [(name, width) for name, table in PUBLISHED_WIDTHS.items()
                                              for width in table])
def test_flops_and_params_match_the_published_mobilenets_within_3_percent(space_name, width):
    space = SPACES[space_name]
    flops, params = flops_and_params(space, space.width_config(width))
    published_mflops, published_mparams = PUBLISHED_WIDTHS[space_name][width]
    assert abs(flops / 1e6 / published_mflops - 1) <= 0.03
    assert abs(params / 1e6 / published_mparams - 1) <= 0.03


def test_widths_are_rounded_as_universally_slimmable_networks():
    # make_divisible(c * w, 8) per layer; MobileNetV2's head conv keeps 1280 at every width <= 1
    assert SLIM_MBV2.width_config(0.35)["width"] == [16, 8, 8, 16, 24, 32, 56, 112, 1280]
    assert SLIM_MBV1.width_config(0.25)["width"] == [8, 16, 32, 64, 128, 256, 256]
    rng = random.Random(0)
    for _ in range(20):
        width = rng.uniform(0.35, 1.0)
        expected = [make_divisible(c * width) for c in (32, 16, 24, 32, 64, 96, 160, 320)] + [1280]
        assert SLIM_MBV2.width_config(width)["width"] == expected
    assert SLIM_MBV2.max_config() == SLIM_MBV2.width_config(1.0)
    assert SLIM_MBV1.min_config() == SLIM_MBV1.width_config(0.25)
    for bad in (0.2, 1.01):
        with pytest.raises(ValueError, match="outside"):
            SLIM_MBV2.width_config(bad)
    with pytest.raises(ValueError, match="not slimmable"):
        TINY.width_config(0.5)


@pytest.mark.parametrize("space", SLIM_SPACES, ids=lambda s: s.name)
def test_flops_grow_with_width_and_random_configs_are_single_widths(space):
    low, high = space.width_range
    grid = [low + (high - low) * i / 200 for i in range(201)]
    flops = [flops_and_params(space, space.width_config(w))[0] for w in grid]
    assert all(a <= b for a, b in zip(flops, flops[1:])) and flops[0] < flops[-1]
    for seed in range(10):  # the sandwich's random subnets are whole networks at one uniform width
        assert space.random_config(random.Random(seed)) == space.width_config(random.Random(seed).uniform(low, high))


@pytest.mark.parametrize("space", SLIM_SPACES, ids=lambda s: s.name)
def test_hook_counts_equal_the_analytic_count_at_random_widths(space):
    supernet = ElasticSupernet(space)
    rng = random.Random(2)
    for width in [space.width_range[0], space.width_range[1]] + [rng.uniform(*space.width_range) for _ in range(3)]:
        config = space.width_config(width)
        static = extract(supernet, config)
        flops, params = flops_and_params(space, config)
        assert count_with_hooks(static, config["resolution"]) == flops
        assert sum(p.numel() for p in static.parameters()) == params


@pytest.mark.parametrize("space", DIGITS_SPACES, ids=lambda s: s.name)
def test_static_subnets_compute_what_the_supernet_computes_at_a_width(space):
    torch.manual_seed(3)
    supernet = ElasticSupernet(space)
    generator = torch.Generator().manual_seed(4)
    for module in supernet.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
    supernet.eval()
    images = torch.randn(3, 3, 16, 16)
    rng = random.Random(5)
    for width in [space.width_range[0], space.width_range[1]] + [rng.uniform(*space.width_range) for _ in range(4)]:
        config = space.width_config(width)
        with torch.no_grad():
            assert (supernet(images, config) - extract(supernet, config).eval()(images)).abs().max() <= 1e-5


def test_residuals_follow_the_mobilenet_family():
    v2 = extract(ElasticSupernet(SLIM_MBV2), SLIM_MBV2.width_config(1.0))
    blocks = [m for m in v2.modules() if isinstance(m, StaticMBConv)]
    # MobileNetV2: an identity residual in every block but the first of each stage (stride 1, same width)
    assert [block.residual for block in blocks] == [False, False, True, False, True, True, False, True, True, True,
                                                    False, True, True, False, True, True, False]
    assert not any(isinstance(m, nn.SiLU) for m in v2.modules())
    v1 = extract(ElasticSupernet(SLIM_MBV1), SLIM_MBV1.width_config(0.5))
    assert not any(block.residual for block in v1.modules() if isinstance(block, StaticMBConv))
    assert sum(isinstance(m, nn.Conv2d) for m in v1.modules()) == 27  # stem + 13 x (depthwise + pointwise)


def test_width_lists_parse_and_check_the_range():
    assert parse_widths("0.35:1.0:0.05", SLIM_MBV2) == SLIM_MBV2.width_grid()
    assert parse_widths("0.25,0.5,1", SLIM_MBV1) == [0.25, 0.5, 1.0]
    assert parse_widths("all", SLIM_MBV1)[0] == 0.25 and parse_widths("all", SLIM_MBV1)[-1] == 1.0
    for text, message in (("0.1:1.0:0.1", "outside"), ("a,b", "low:high:step"), ("1:0.5:0.1", "low:high:step")):
        with pytest.raises(ValueError, match=message):
            parse_widths(text, SLIM_MBV2)
    with pytest.raises(ValueError, match="not slimmable"):
        parse_widths("0.5", TINY)


def test_flops_cli_takes_a_width(capsys):
    cli.main(["flops", "--space", "slim_mbv1", "--width", "0.25"])
    out = capsys.readouterr().out
    assert "41.0 MFLOPs, 0.47 M parameters" in out and "published: 41 MFLOPs" in out
    for argv, message in ((["--space", "slim_mbv2", "--width", "0.2"], "outside"),
                          (["--space", "tiny", "--width", "0.5"], "not slimmable"),
                          (["--space", "slim_mbv1"], "one of --arch and --width")):
        with pytest.raises(SystemExit, match=message):
            cli.main(["flops", *argv])


@pytest.mark.skipif("cpu" not in ak.available_backends(), reason="CPU extension not built")
def test_slim_digits_training_prints_and_writes_a_row_per_width(tmp_path, capsys):
    config = resolve_config("slim-digits", overrides={"epochs": "1", "batch_size": "256", "calib_images": "256",
                                                      "out": str(tmp_path / "run"), "kd_temperature": "2"})
    summary = train.run_training(config)
    rows = summary["widths"]
    assert [row["width"] for row in rows] == SLIM_MBV2_DIGITS.width_grid()
    assert all(0 <= row["top1"] <= 100 for row in rows)
    assert [row["mflops"] for row in rows] == sorted(row["mflops"] for row in rows)
    printed = capsys.readouterr().out
    assert "params (M)" in printed and f"{rows[0]['mflops']:.2f}" in printed
    with open(tmp_path / "run" / "widths.json") as handle:
        assert json.load(handle) == rows
    for suffix in (".csv", ".png"):
        assert (tmp_path / "run" / f"widths{suffix}").stat().st_size > 0
