"""The elastic supernet: search space, elastic ops, extraction, FLOPs and BN recalibration."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from supernet import ALPHANET, TINY, ElasticSupernet, count_with_hooks, extract, flops_and_params, mflops, recalibrate_bn
from supernet.cli import main as cli_main
from supernet.ops import ElasticBatchNorm2d, ElasticConv2d, ElasticDepthwiseConv2d, ElasticLinear, ElasticSqueezeExcite
from supernet.space import se_width


@pytest.fixture(scope="module")
def alphanet_supernet():
    torch.manual_seed(0)
    return ElasticSupernet(ALPHANET).eval()


def randomise_bn(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN statistics and affine parameters (fresh ones are identities)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(channels, generator=generator) * 0.1)


# -- search space -----------------------------------------------------------------------------

def test_alphanet_reference_points(alphanet_supernet):
    low, high = ALPHANET.min_config(), ALPHANET.max_config()
    assert low["resolution"] == 192 and high["resolution"] == 288
    assert mflops(ALPHANET, low) == pytest.approx(203.4, abs=0.1)
    assert mflops(ALPHANET, high) == pytest.approx(1939.3, abs=0.1)
    supernet_params = sum(p.numel() for p in alphanet_supernet.parameters())
    assert supernet_params / 1e6 == pytest.approx(23.93, abs=0.1)


def test_published_alphanet_config_pastes_in():
    alphanet_a0 = {"resolution": 224, "width": [16, 16, 24, 32, 64, 112, 192, 216, 1792],
                   "depth": [1, 3, 3, 3, 3, 3, 1], "kernel_size": [3, 3, 3, 3, 3, 3, 3],
                   "expand_ratio": [1, 4, 4, 4, 4, 6, 6]}
    assert ALPHANET.validate(json.loads(json.dumps(alphanet_a0))) is not None
    assert 200 < mflops(ALPHANET, alphanet_a0) < 300


@pytest.mark.parametrize("space", [ALPHANET, TINY], ids=lambda s: s.name)
def test_sampling_mutation_and_crossover_stay_in_the_space(space):
    rng = random.Random(1)
    for _ in range(50):
        a, b = space.random_config(rng), space.random_config(rng)
        space.validate(space.mutate(a, rng, 0.2))
        child = space.crossover(a, b, rng)
        space.validate(child)
        for key in ("width", "depth", "kernel_size", "expand_ratio"):
            assert all(gene in (x, y) for gene, x, y in zip(child[key], a[key], b[key]))
    assert space.mutate(a, rng, 0.0) == a
    low, high = mflops(space, space.min_config()), mflops(space, space.max_config())
    window = (low + (high - low) * 0.3, low + (high - low) * 0.5)
    for _ in range(5):
        assert window[0] <= mflops(space, space.random_config_in_window(rng, lambda c: mflops(space, c), *window)) \
            <= window[1]


@pytest.mark.parametrize("mutation,message", [
    (lambda c: c.pop("depth"), "missing \\['depth'\\]"),
    (lambda c: c.update(extra=1), "unknown \\['extra'\\]"),
    (lambda c: c.update(resolution=200), "resolution = 200"),
    (lambda c: c["width"].__setitem__(3, 33), "width\\[3\\] = 33"),
    (lambda c: c["depth"].pop(), "'depth' must be a list of 7"),
    (lambda c: c["kernel_size"].__setitem__(0, 7), "kernel_size\\[0\\] = 7"),
])
def test_invalid_config_names_the_bad_key_and_value(mutation, message):
    config = ALPHANET.max_config()
    mutation(config)
    with pytest.raises(ValueError, match=message):
        ALPHANET.validate(config)


# -- elastic ops against static ops holding the copied slice ----------------------------------

@pytest.mark.parametrize("channels_last", [False, True])
def test_elastic_ops_equal_static_ops_on_the_slice(channels_last):
    generator = torch.Generator().manual_seed(3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 12, 9, 9, generator=generator).to(memory_format=fmt)

    conv = ElasticConv2d(16, 24, 1)
    static = nn.Conv2d(12, 20, 1, bias=False)
    static.weight.data.copy_(conv.weight[:20, :12])
    assert (conv(x, 20) - static(x)).abs().max() <= 1e-5

    stem = ElasticConv2d(3, 24, 3, stride=2)
    image = torch.randn(2, 3, 17, 17, generator=generator).to(memory_format=fmt)
    static_stem = nn.Conv2d(3, 16, 3, 2, 1, bias=False)
    static_stem.weight.data.copy_(stem.weight[:16])
    assert (stem(image, 16) - static_stem(image)).abs().max() <= 1e-5

    depthwise = ElasticDepthwiseConv2d(16, 7, stride=2)
    for kernel in (3, 5, 7):
        static_dw = nn.Conv2d(12, 12, kernel, 2, kernel // 2, groups=12, bias=False)
        offset = (7 - kernel) // 2
        static_dw.weight.data.copy_(depthwise.weight[:12, :, offset:offset + kernel, offset:offset + kernel])
        assert (depthwise(x, kernel) - static_dw(x)).abs().max() <= 1e-5

    bn = ElasticBatchNorm2d(16)
    randomise_bn(bn, generator)
    static_bn = nn.BatchNorm2d(12)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(static_bn, name).data.copy_(getattr(bn, name)[:12])
    for training in (False, True):
        bn.train(training)
        static_bn.train(training)
        assert (bn(x) - static_bn(x)).abs().max() <= 1e-5
    assert torch.allclose(bn.running_mean[:12], static_bn.running_mean, atol=1e-6)
    assert torch.allclose(bn.running_var[:12], static_bn.running_var, atol=1e-6)

    se = ElasticSqueezeExcite(16)
    squeeze = se_width(12)
    reduce = nn.Conv2d(12, squeeze, 1)
    expand = nn.Conv2d(squeeze, 12, 1)
    reduce.weight.data.copy_(se.reduce.weight[:squeeze, :12])
    reduce.bias.data.copy_(se.reduce.bias[:squeeze])
    expand.weight.data.copy_(se.expand.weight[:12, :squeeze])
    expand.bias.data.copy_(se.expand.bias[:12])
    gate = F.hardsigmoid(expand(F.relu(reduce(x.mean((2, 3), keepdim=True)))))
    assert (se(x) - x * gate).abs().max() <= 1e-5

    linear = ElasticLinear(32, 10)
    features = torch.randn(4, 20, generator=generator)
    assert (linear(features) - F.linear(features, linear.weight[:, :20], linear.bias)).abs().max() <= 1e-5


# -- extraction and FLOPs ---------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True])
def test_extracted_subnets_equal_the_supernet(channels_last):
    torch.manual_seed(4)
    supernet = ElasticSupernet(TINY)
    randomise_bn(supernet, torch.Generator().manual_seed(5))
    for module in supernet.modules():  # non-zero residual branches, so every layer matters
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
    supernet.eval()
    rng = random.Random(6)
    images = torch.randn(3, 3, 32, 32)
    if channels_last:
        supernet = supernet.to(memory_format=torch.channels_last)
        images = images.to(memory_format=torch.channels_last)
    configs = [TINY.min_config(), TINY.max_config()] + [TINY.random_config(rng) for _ in range(18)]
    for config in configs:
        static = extract(supernet, config).eval()
        assert not any(isinstance(m, (ElasticConv2d, ElasticBatchNorm2d)) for m in static.modules())
        with torch.no_grad():
            assert (supernet(images, config) - static(images)).abs().max() <= 1e-5, config


def test_extracted_alphanet_subnets_equal_the_supernet(alphanet_supernet):
    rng = random.Random(7)
    images = torch.randn(1, 3, 200, 200)
    for config in (ALPHANET.min_config(), ALPHANET.random_config(rng)):
        with torch.no_grad():
            expected = alphanet_supernet(images, config)
            assert (extract(alphanet_supernet, config).eval()(images) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("space", [ALPHANET, TINY], ids=lambda s: s.name)
def test_analytic_flops_and_params_equal_hook_counts(space, alphanet_supernet):
    supernet = alphanet_supernet if space is ALPHANET else ElasticSupernet(TINY)
    rng = random.Random(8)
    for _ in range(50):
        config = space.random_config(rng)
        static = extract(supernet, config)
        flops, params = flops_and_params(space, config)
        assert count_with_hooks(static, config["resolution"]) == flops
        assert sum(p.numel() for p in static.parameters()) == params


def test_extracted_subnet_saves_and_loads_without_supernet_code(tmp_path):
    torch.manual_seed(9)
    static = extract(ElasticSupernet(TINY).eval(), TINY.random_config(random.Random(9))).eval()
    path = tmp_path / "subnet.pt"
    torch.jit.script(static).save(str(path))
    images = torch.randn(2, 3, 32, 32)
    torch.save(images, tmp_path / "images.pt")
    with torch.no_grad():
        expected = static(images)
    script = ("import sys, torch; m = torch.jit.load(sys.argv[1]); x = torch.load(sys.argv[2]);"
              "print(float(m(x).sum())); assert 'supernet' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "images.pt")],
                          capture_output=True, text=True, cwd=tmp_path, check=True)
    assert float(done.stdout) == pytest.approx(float(expected.sum()), rel=1e-5, abs=1e-5)


# -- BN recalibration -------------------------------------------------------------------------

def test_recalibrated_bn_holds_the_statistics_of_the_calibration_batches():
    torch.manual_seed(10)
    supernet = ElasticSupernet(TINY, dropout=0.2, drop_connect=0.2)
    config = TINY.random_config(random.Random(10))
    batches = [torch.randn(4, 3, 32, 32) * (1 + i) for i in range(3)]
    seen = {}

    def record(module, inputs, output):
        x = inputs[0].detach()
        means, variances = seen.setdefault(module, ([], []))
        means.append(x.mean((0, 2, 3)))
        variances.append(x.var((0, 2, 3), unbiased=True))

    norms = [m for m in supernet.modules() if isinstance(m, nn.BatchNorm2d)]
    handles = [bn.register_forward_hook(record) for bn in norms]
    weights_before = {name: p.clone() for name, p in supernet.named_parameters()}
    used = recalibrate_bn(supernet, batches, forward=lambda x: supernet(x, config))
    for handle in handles:
        handle.remove()
    assert used == 3
    for bn, (means, variances) in seen.items():
        channels = means[0].numel()
        assert torch.allclose(bn.running_mean[:channels], torch.stack(means).mean(0), atol=1e-5)
        assert torch.allclose(bn.running_var[:channels], torch.stack(variances).mean(0), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(p, weights_before[name]) for name, p in supernet.named_parameters())


# -- the real-size subnets train on CPU -------------------------------------------------------

@pytest.mark.parametrize("which", ["min", "max"])
def test_alphanet_subnets_forward_backward_channels_last_bf16(which, alphanet_supernet):
    config = ALPHANET.min_config() if which == "min" else ALPHANET.max_config()
    supernet = alphanet_supernet.train().to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, config["resolution"], config["resolution"]).to(memory_format=torch.channels_last)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = supernet(images, config)
        assert logits.shape == (2, 1000)
        logits.float().logsumexp(-1).mean().backward()
        assert supernet.classifier.weight.grad is not None and torch.isfinite(supernet.classifier.weight.grad).all()
    finally:
        supernet.zero_grad(set_to_none=True)
        supernet.eval()


def test_flops_cli_prints_mflops_and_parameters(tmp_path, capsys):
    cli_main(["flops", "--arch", "min", "--space", "alphanet"])
    assert "203.4 MFLOPs" in capsys.readouterr().out
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(ALPHANET.max_config()))
    cli_main(["flops", "--arch", str(arch)])
    assert "1939.3 MFLOPs" in capsys.readouterr().out
    arch.write_text(json.dumps({**ALPHANET.max_config(), "resolution": 100}))
    with pytest.raises(SystemExit, match="resolution = 100"):
        cli_main(["flops", "--arch", str(arch)])
