"""Behaving as the AlphaNet / AttentiveNAS reference code: regularisation of the sandwich step, the LR
schedule, mutation, the bucket archive of the search, the published models and the conversion of the
reference's checkpoints (checked against an independent functional statement of the reference's model)."""
from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import random
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import alphadiv_kernels as ak
from supernet import ALPHANET, ElasticSupernet, mflops
from supernet import model as model_module
from supernet import engine, train
from supernet.config import resolve_config
from supernet.convert import convert_state_dict
from supernet.search import EvolutionarySearch, SearchConfig, bucket_archive
from supernet.space import DIGITS, PUBLISHED, TINY
from supernet.cli import main as cli_main

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "alphanet_reference_state_dict.json")


# -- regularisation of the sandwich step -------------------------------------------------------

def record_regularisation(monkeypatch, model):
    """Count dropout and drop-connect calls per forward pass of `model`."""
    calls = []
    real_dropout, real_drop_connect = F.dropout, model_module.drop_connect
    monkeypatch.setattr(F, "dropout", lambda x, p=0.5, *a, **k: (calls[-1]["dropout"].append(p),
                                                                   real_dropout(x, p, *a, **k))[1])

    def drop_connect(x, rate):
        calls[-1]["drop_connect"].append(rate)
        return real_drop_connect(x, rate)

    monkeypatch.setattr(model_module, "drop_connect", drop_connect)
    real_forward = model.forward

    def forward(*args, **kwargs):
        calls.append({"dropout": [], "drop_connect": []})
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    return calls


@pytest.mark.skipif("cpu" not in ak.available_backends(), reason="CPU extension not built")
def test_students_run_without_dropout_and_drop_connect(monkeypatch):
    torch.manual_seed(0)
    model = ElasticSupernet(DIGITS, dropout=0.3, drop_connect=0.4).train()
    calls = record_regularisation(monkeypatch, model)
    config = resolve_config("digits")
    images, labels = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    subnets = [DIGITS.random_config(random.Random(1)) for _ in range(2)]
    train.sandwich_backward(model, images, labels, subnets, config, contextlib.nullcontext,
                            torch.amp.GradScaler("cpu", enabled=False))
    assert len(calls) == 4  # max, two random, min
    assert calls[0]["dropout"] == [0.3] and calls[0]["drop_connect"]
    assert all(call == {"dropout": [], "drop_connect": []} for call in calls[1:])


def test_drop_connect_acts_only_on_identity_blocks_of_the_last_two_stages(monkeypatch):
    model = ElasticSupernet(ALPHANET, dropout=0.2, drop_connect=0.2).train()
    rates = []
    real = model_module.drop_connect
    monkeypatch.setattr(model_module, "drop_connect", lambda x, rate: (rates.append(rate), real(x, rate))[1])
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64), ALPHANET.max_config(), regularize=True)
    # The max network has 2+5+6+6+8+8+2 = 37 blocks; mb6 holds blocks 27..34 and mb7 35..36. Their first
    # blocks change the stride (mb6) or the width (mb7: 216 -> 224), so their shortcut is not the identity.
    expected = [0.2 * index / 37 for index in list(range(28, 35)) + [36]]
    assert rates == pytest.approx(expected, rel=1e-12)
    rates.clear()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64), ALPHANET.max_config())  # a student's forward
        model.eval()(torch.randn(2, 3, 64, 64), ALPHANET.max_config(), regularize=True)  # never in eval mode
    assert rates == []


# -- the LR schedule ---------------------------------------------------------------------------

def reference_lr_factor(step, warmup_steps, total_steps):
    """AttentiveNAS's WarmupCosineLR with linear warm-up from 0.001 and no LR clamp, as written there."""
    warmup = 1.0 if step >= warmup_steps else 0.001 * (1 - step / warmup_steps) + step / warmup_steps
    return warmup * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def test_lr_schedule_equals_the_reference_formula():
    config = resolve_config("digits", overrides={"epochs": "10", "warmup_epochs": "2", "lr_per_256": "0.8"})
    model = torch.nn.Linear(2, 2)
    optimizer = engine.make_optimizer(model, config, 256)
    schedule = engine.make_schedule(optimizer, config, steps_per_epoch=7)
    warmup, total = 14, 70
    seen = {}
    for step in range(total):
        seen[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
    assert seen[0] == pytest.approx(0.8 * 0.001)
    for step in (0, 1, warmup - 1, warmup, warmup + 1, total // 2, total - 1):
        assert seen[step] == pytest.approx(0.8 * reference_lr_factor(step, warmup, total), rel=1e-12), step
    assert seen[warmup] == pytest.approx(0.8 * 0.5 * (1 + math.cos(math.pi * warmup / total)))


# -- search: mutation, initial population, bucket archive --------------------------------------

@pytest.mark.parametrize("space", [ALPHANET, TINY], ids=lambda s: s.name)
def test_a_mutated_gene_always_takes_a_different_value(space):
    rng = random.Random(2)
    choices = space.choices()
    for _ in range(30):
        parent = space.random_config(rng)
        child = space.mutate(parent, rng, probability=1.0)
        for key, genes in choices.items():
            values = [(parent[key], child[key])] if key == "resolution" else zip(parent[key], child[key])
            for (before, after), options in zip(values, genes):
                assert after != before or len(options) == 1, (key, before, after)


def test_bucket_archive_keeps_the_best_subnet_per_bucket():
    points = [{"mflops": 203.0, "top1": 70.0}, {"mflops": 207.0, "top1": 71.0}, {"mflops": 204.9, "top1": 69.0},
              {"mflops": 215.1, "top1": 60.0}, {"mflops": 224.0, "top1": 75.0}]
    archive = bucket_archive(points, 10.0)
    assert archive == {200.0: points[0], 210.0: points[1], 220.0: points[4]}


class _FakeTrained:
    """What the search reads of a trained supernet, with accuracies made up from the arch."""

    space = DIGITS

    def evaluate(self, arch, split, calib_images):
        score = sum(arch["width"]) % 17 + arch["resolution"] / 10
        return {"arch": arch, "mflops": mflops(DIGITS, arch), "top1": float(score)}


def test_search_starts_from_the_min_subnet_and_breeds_only_from_the_bucket_archive(tmp_path, monkeypatch):
    config = SearchConfig(population=12, mutations=6, crossovers=6, iterations=2, bucket_mflops=0.2, seed=3)
    search = EvolutionarySearch(_FakeTrained(), config, str(tmp_path))
    first = search.evaluate_all([DIGITS.min_config()])
    assert first[0]["arch"] == DIGITS.min_config()
    parents_used = []
    real_mutate, real_crossover = DIGITS.mutate, DIGITS.crossover
    monkeypatch.setattr(type(DIGITS), "mutate", lambda self, arch, rng, p=0.2: (parents_used.append(arch),
                                                                                 real_mutate(arch, rng, p))[1])
    monkeypatch.setattr(type(DIGITS), "crossover", lambda self, a, b, rng: (parents_used.extend([a, b]),
                                                                             real_crossover(a, b, rng))[1])
    rng = random.Random(4)
    archive = [_FakeTrained().evaluate(DIGITS.random_config(rng), "val", 1) for _ in range(40)]
    allowed = [json.dumps(point["arch"], sort_keys=True) for point in bucket_archive(archive, 0.2).values()]
    assert 1 < len(allowed) < len(archive)
    search.children(archive, rng)
    assert parents_used and all(json.dumps(arch, sort_keys=True) in allowed for arch in parents_used)
    monkeypatch.undo()
    (tmp_path / "run").mkdir()
    population = EvolutionarySearch(_FakeTrained(), config, str(tmp_path / "run")).run()
    assert population[0]["arch"] == DIGITS.min_config()


# -- published models ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_models_have_their_published_mflops(name, capsys):
    model = PUBLISHED[name]
    # all round to the published figure except A5-1 (594.8, published 596)
    assert mflops(ALPHANET, model.arch) == pytest.approx(model.mflops, rel=0.005, abs=0.5)
    cli_main(["flops", "--arch", name])
    assert f"published: {model.mflops} MFLOPs" in capsys.readouterr().out


def test_published_model_names_need_the_alphanet_space():
    with pytest.raises(SystemExit, match="needs the alphanet space"):
        cli_main(["flops", "--arch", "a0", "--space", "tiny"])


# -- conversion of the reference's checkpoints --------------------------------------------------

def make_divisible(value, divisor=8):
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def reference_forward(weights, cfg, images):
    """The reference's AttentiveNasDynamicModel forward, restated on its own state-dict names: BN with
    the stored statistics (as its extracted static subnets evaluate), swish, SE with hard-sigmoid,
    shortcuts that pool with padding 1 on odd sizes and project when the widths differ."""
    def conv(x, weight, stride=1, groups=1, bias=None):
        return F.conv2d(x, weight, bias, stride, weight.shape[-1] // 2, 1, groups)

    def bn(x, prefix):
        c = x.size(1)
        return F.batch_norm(x, weights[f"{prefix}.bn.running_mean"][:c], weights[f"{prefix}.bn.running_var"][:c],
                            weights[f"{prefix}.bn.weight"][:c], weights[f"{prefix}.bn.bias"][:c], False, 0.0, 1e-5)

    def swish(x):
        return x * torch.sigmoid(x)

    widths = cfg["width"]
    x = F.interpolate(images, size=cfg["resolution"], mode="bicubic")
    x = swish(bn(conv(x, weights["first_conv.conv.conv.weight"][: widths[0]], 2), "first_conv.bn"))
    index = 0
    for stage, spec in enumerate(ALPHANET.stages):
        for position in range(max(spec.depths)):
            block, index = index, index + 1
            if position >= cfg["depth"][stage]:
                continue
            stride = spec.stride if position == 0 else 1
            p = f"blocks.{block}.mobile_inverted_conv"
            c_in, c_out = x.size(1), widths[stage + 1]
            k = cfg["kernel_size"][stage]
            h, mid = x, c_in
            if f"{p}.inverted_bottleneck.conv.conv.weight" in weights:
                mid = make_divisible(round(c_in * cfg["expand_ratio"][stage]))
                h = swish(bn(conv(h, weights[f"{p}.inverted_bottleneck.conv.conv.weight"][:mid, :c_in]),
                             f"{p}.inverted_bottleneck.bn"))
            depthwise = weights[f"{p}.depth_conv.conv.conv.weight"]
            start = depthwise.shape[-1] // 2 - k // 2
            h = swish(bn(conv(h, depthwise[:mid, :, start:start + k, start:start + k], stride, mid), f"{p}.depth_conv.bn"))
            if f"{p}.depth_conv.se.fc.reduce.weight" in weights:
                squeeze = make_divisible(mid // 4)
                gate = h.mean(3, keepdim=True).mean(2, keepdim=True)
                gate = F.relu(conv(gate, weights[f"{p}.depth_conv.se.fc.reduce.weight"][:squeeze, :mid],
                                   bias=weights[f"{p}.depth_conv.se.fc.reduce.bias"][:squeeze]))
                gate = conv(gate, weights[f"{p}.depth_conv.se.fc.expand.weight"][:mid, :squeeze],
                            bias=weights[f"{p}.depth_conv.se.fc.expand.bias"][:mid])
                h = h * (F.relu6(gate + 3.0) / 6.0)
            h = bn(conv(h, weights[f"{p}.point_linear.conv.conv.weight"][:c_out, :mid]), f"{p}.point_linear.bn")
            shortcut = x
            if stride > 1:
                shortcut = F.avg_pool2d(shortcut, stride, padding=0 if shortcut.size(-1) % 2 == 0 else 1)
            if c_in != c_out:
                shortcut = conv(shortcut, weights[f"blocks.{block}.shortcut.conv.conv.weight"][:c_out, :c_in])
            x = h + shortcut
    c = x.size(1)
    x = swish(bn(conv(x, weights["last_conv.final_expand_layer.conv.conv.weight"][: 6 * c, :c]),
                 "last_conv.final_expand_layer.bn"))
    x = x.mean(3, keepdim=True).mean(2, keepdim=True)
    x = swish(conv(x, weights["last_conv.feature_mix_layer.conv.conv.weight"][: widths[-1], : 6 * c]))
    x = x.mean(3).mean(2)
    return F.linear(x, weights["classifier.linear.linear.weight"][:, : widths[-1]],
                    weights["classifier.linear.linear.bias"])


def reference_weights(seed):
    """Random values under the reference's exact names and shapes; BN statistics that are plausible."""
    with open(DATA) as handle:
        entries = json.load(handle)["entries"]
    generator = torch.Generator().manual_seed(seed)
    weights = collections.OrderedDict()
    for name, shape in entries:
        if name.endswith("num_batches_tracked"):
            weights[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            weights[name] = torch.rand(shape, generator=generator) + 0.5
        elif name.endswith(("bn.weight", "bn.bias", "running_mean")):
            weights[name] = torch.randn(shape, generator=generator) * 0.1 + (1.0 if name.endswith("weight") else 0.0)
        else:
            fan_in = max(1, math.prod(shape[1:]))
            weights[name] = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    return weights


@contextlib.contextmanager
def reference_config_classes():
    """The reference's `utils.config.Config` (a dict whose attributes are its items), as a module."""
    package, module = types.ModuleType("utils"), types.ModuleType("utils.config")

    class AttrDict(dict):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.__dict__ = self
            for key, value in self.items():
                if isinstance(value, dict):
                    self[key] = AttrDict(value)

    class Config(AttrDict):
        pass

    for cls in (AttrDict, Config):
        cls.__module__, cls.__qualname__ = "utils.config", cls.__name__
        setattr(module, cls.__name__, cls)
    package.config = module
    saved = {name: sys.modules.get(name) for name in ("utils", "utils.config")}
    sys.modules.update({"utils": package, "utils.config": module})
    try:
        yield Config
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value


def write_reference_checkpoint(path, weights):
    with reference_config_classes() as Config:
        args = Config({"arch": "attentive_nas_dynamic_model", "batch_size_per_gpu": 32, "alpha_min": -1.0,
                       "lr_scheduler": {"method": "warmup_cosine_lr", "base_lr": 0.1}})
        state = {"epoch": 360, "args": args,
                 "state_dict": collections.OrderedDict((f"module.{k}", v) for k, v in weights.items()),
                 "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"last_epoch": 10}}
        torch.save(state, path, _use_new_zipfile_serialization=False)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("convert")
    weights = reference_weights(seed=11)
    write_reference_checkpoint(folder / "alphanet_pretrained.pth.tar", weights)
    cli_main(["convert", str(folder / "alphanet_pretrained.pth.tar"), str(folder / "converted.pt")])
    return weights, folder


def test_conversion_fills_every_entry_and_uses_every_reference_entry(converted):
    weights, folder = converted
    state = torch.load(folder / "converted.pt", weights_only=True)
    supernet = ElasticSupernet(ALPHANET)
    assert set(state["model"]) == set(supernet.state_dict())
    used = [name for name in weights if ".bn_tracking." not in name]
    assert len(used) == len(state["model"])
    assert torch.equal(state["model"]["stages.5.3.depthwise.weight"],
                       weights["blocks.30.mobile_inverted_conv.depth_conv.conv.conv.weight"])  # mb6 starts at block 27
    assert state["config"]["space"] == "alphanet"


@pytest.mark.parametrize("arch", ["a0", "a4", "max"])
def test_converted_supernet_computes_the_reference_models_logits(converted, arch):
    weights, folder = converted
    supernet = ElasticSupernet(ALPHANET)
    supernet.load_state_dict(torch.load(folder / "converted.pt", weights_only=True)["model"])
    cfg = ALPHANET.max_config() if arch == "max" else PUBLISHED[arch].arch
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        ours = supernet.eval()(images, cfg)
        expected = reference_forward(weights, cfg, images)
    assert ours.shape == (2, 1000)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_conversion_names_the_first_mismatch(tmp_path):
    weights = reference_weights(seed=1)
    bad = collections.OrderedDict(weights)
    bad["blocks.3.mobile_inverted_conv.point_linear.conv.conv.weight"] = torch.zeros(5, 5, 1, 1)
    with pytest.raises(ValueError, match=r"blocks.3.mobile_inverted_conv.point_linear.conv.conv.weight.*\(5, 5, 1, 1\)"):
        convert_state_dict(bad)
    del bad["blocks.3.mobile_inverted_conv.point_linear.conv.conv.weight"]
    with pytest.raises(ValueError, match="lacks 1 entries.*stages.1.1.project.weight"):
        convert_state_dict(bad)
    extra = collections.OrderedDict(weights, **{"blocks.99.shortcut.conv.conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="blocks.99"):
        convert_state_dict(extra)


def test_conversion_never_runs_pickled_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"state_dict": {}, "args": Payload()}, tmp_path / "evil.pth.tar")
    with pytest.raises(SystemExit, match="objects other than plain data"):
        cli_main(["convert", str(tmp_path / "evil.pth.tar"), str(tmp_path / "out.pt")])
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out.pt").exists()


def test_search_can_seed_its_initial_population_with_given_archs(tmp_path):
    rng = random.Random(5)
    seeds = tuple(DIGITS.random_config(rng) for _ in range(2))
    config = SearchConfig(population=6, mutations=0, crossovers=0, iterations=1, bucket_mflops=0.2, seeds=seeds)
    archive = EvolutionarySearch(_FakeTrained(), config, str(tmp_path)).run()
    assert [point["arch"] for point in archive[:3]] == [DIGITS.min_config(), *seeds] and len(archive) == 6


def test_search_evaluates_the_reference_count_the_first_iteration_being_the_initial_population(tmp_path):
    """The reference's 20 iterations of 512 / 128 + 128 evaluate 512 + 19 x 256 = 5,376 subnets."""
    config = SearchConfig(population=12, mutations=3, crossovers=3, iterations=4, bucket_mflops=0.2, seed=1)
    archive = EvolutionarySearch(_FakeTrained(), config, str(tmp_path)).run()
    assert len(archive) == 12 + (4 - 1) * (3 + 3)
    one_round = SearchConfig(population=12, mutations=3, crossovers=3, iterations=1, bucket_mflops=0.2, seed=1)
    (tmp_path / "one").mkdir()
    assert len(EvolutionarySearch(_FakeTrained(), one_round, str(tmp_path / "one")).run()) == 12
