"""`alphanet distill` and `alphanet finetune` on digits."""
from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
import torch.nn.functional as F

import alphadiv_kernels as ak
from supernet import distill, models
from supernet.cli import main as cli_main
from supernet.data import digits_splits
from supernet.errors import run_command

pytestmark = pytest.mark.skipif("cpu" not in ak.available_backends(), reason="CPU extension not built")
QUICK = {"epochs": "2", "teacher_epochs": "2", "batch_size": "128"}


@pytest.mark.parametrize("kd", ["adaptive", "kl", "symmetric"])
@pytest.mark.parametrize("temperature,t_squared", [(1.0, True), (3.0, True), (3.0, False)])
def test_the_loss_is_one_minus_beta_ce_plus_beta_t_squared_kd(gen, kd, temperature, t_squared):
    config = distill.resolve(values={"kd": kd, "kd_temperature": str(temperature), "beta": "0.7",
                                     "kd_t_squared": str(t_squared)})
    student, teacher = torch.randn(16, 10, generator=gen, dtype=torch.float64), torch.randn(16, 10, generator=gen,
                                                                                             dtype=torch.float64)
    labels = torch.randint(0, 10, (16,), generator=gen)
    got = distill.distill_loss(student, teacher, labels, config)["loss"]
    q, p = F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1)
    if kd == "kl":
        divergence = (p.exp() * (p - q)).sum(-1)
    elif kd == "symmetric":  # KL(p || q) + KL(q || p)
        divergence = (p.exp() * (p - q)).sum(-1) + (q.exp() * (q - p)).sum(-1)
    else:  # max of the clipped alpha = -1 and alpha = 1 divergences (no clip active for alpha = 1)
        reverse = ((q.exp() * torch.clamp(torch.exp(-(p - q)), max=5.0)).sum(-1) - 1) / 2
        divergence = torch.maximum(reverse, (p.exp() * (p - q)).sum(-1))
    scale = temperature**2 if t_squared else 1.0
    expected = 0.3 * F.cross_entropy(student, labels) + 0.7 * scale * divergence.mean()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)  # the CE term is computed in float32


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("distill") / "run")
    config = distill.resolve(values={**QUICK, "out": out})
    summary = distill.run_distill(config)
    return out, summary


def test_distill_trains_the_default_teacher_first_and_reports_both(distilled, capsys):
    out, summary = distilled
    assert os.path.exists(os.path.join(out, "teacher", "summary.txt"))
    assert 0 <= summary["test_top1"] <= 100 and summary["test_teacher_top1"] > 30
    lines = open(os.path.join(out, "summary.txt")).read().splitlines()
    assert lines[0].startswith("student test top-1: ") and lines[1].startswith("teacher test top-1: ")


def test_the_teacher_gets_no_gradient_and_keeps_its_bn_statistics(distilled, monkeypatch):
    out, _ = distilled
    config = distill.resolve(values={**QUICK, "out": out})
    runtime = distill.setup_runtime()
    teacher = distill.load_teacher(config, 10, runtime)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = models.build(config.student, 10)
    images, labels = digits_splits()["train"].tensors
    images, labels = images[:64], labels[:64]
    with torch.no_grad():
        teacher_logits = teacher(images)
    distill.distill_loss(student(images), teacher_logits, labels, config)["loss"].backward()
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_cache_teacher_gives_the_same_losses_as_recomputing_it(distilled, tmp_path):
    out, _ = distilled
    runs = {}
    for cache in ("false", "true"):
        folder = tmp_path / f"cache-{cache}"
        folder.mkdir()
        os.symlink(os.path.join(out, "teacher"), folder / "teacher")  # the same trained teacher
        config = distill.resolve(values={**QUICK, "epochs": "1", "cache_teacher": cache, "out": str(folder)})
        distill.run_distill(config)
        with open(folder / "steps.jsonl") as handle:
            runs[cache] = [json.loads(line) for line in handle]
    for plain, cached in zip(runs["false"], runs["true"]):
        assert cached["kd"] == pytest.approx(plain["kd"], rel=1e-5, abs=1e-7)
        assert cached["loss"] == pytest.approx(plain["loss"], rel=1e-5, abs=1e-7)


def test_cache_teacher_is_refused_for_augmented_data():
    with pytest.raises(ValueError, match="random augmentation"):
        distill.resolve(values={"cache_teacher": "true", "dataset": "cifar10", "data_path": "/tmp"})


def test_distill_resumes_exactly(tmp_path, distilled):
    out, _ = distilled
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for folder in (straight, resumed):
        folder.mkdir()
        os.symlink(os.path.join(out, "teacher"), folder / "teacher")
    distill.run_distill(distill.resolve(values={**QUICK, "out": str(straight)}))
    assert distill.run_distill(distill.resolve(values={**QUICK, "out": str(resumed)}), stop_at_step=5)["stopped"]
    with contextlib.suppress(SystemExit):
        cli_main(["distill", "--resume", str(resumed)])
    read = lambda folder: [json.loads(line) for line in open(folder / "steps.jsonl")]
    assert read(resumed) == read(straight)


def test_distill_bad_input_is_one_line(tmp_path):
    for argv, fragment in ((["--student", "resnet18"], "is not one of"),
                           (["--beta", "2"], "'beta' must be in [0, 1]"),
                           (["--teacher", "export:/nowhere"], "arch.json is missing")):
        with pytest.raises(SystemExit) as stop:
            cli_main(["distill", *argv, "--out", str(tmp_path / "run")])
        assert fragment in str(stop.value.code) and "\n" not in str(stop.value.code)


@pytest.fixture(scope="module")
def short_supernet(tmp_path_factory):
    """A digits supernet after 2 epochs: its subnets are far from converged."""
    from supernet import train
    from supernet.config import resolve_config

    folder = tmp_path_factory.mktemp("supernet")
    config = resolve_config("digits", overrides={"epochs": "2", "batch_size": "128", "num_random_subnets": "0",
                                                 "calib_images": "256", "out": str(folder / "run")})
    train.run_training(config)
    return config.out


@pytest.fixture(scope="module")
def exported_subnet(short_supernet, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    cli_main(["export", "--checkpoint", short_supernet, "--arch", "max", "--out", str(folder / "export"),
              "--calib-images", "256"])
    return str(folder / "export")


def test_a_subnet_fine_tuned_with_inherited_weights_beats_itself_before(short_supernet, tmp_path, capsys):
    """Figure 5's "#75ep" at laptop scale: the min subnet keeps the supernet's weights and classifier and
    is distilled from the max subnet."""
    config = distill.resolve(values={"student": f"supernet:{short_supernet}:min",
                                     "teacher": f"supernet:{short_supernet}:max", "epochs": "3", "batch_size": "128",
                                     "out": str(tmp_path / "ft")})
    summary = distill.run_distill(config)
    assert summary["test_top1"] > summary["test_top1_before"] + 5
    assert "student test top-1 before distillation:" in capsys.readouterr().out


def test_finetune_an_export_on_five_classes_replaces_the_classifier(exported_subnet, tmp_path, capsys):
    out = tmp_path / "finetune"
    cli_main(["finetune", "--model", f"export:{exported_subnet}", "--classes", "0,1,2,3,4", "--epochs", "2",
              "--lr", "0.01,0.05", "--weight-decay", "0,1e-4", "--out", str(out)])
    record = json.loads((out / "finetune.json").read_text())
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert weights["classifier.1.weight"].shape[0] == 5 and weights["classifier.1.bias"].shape == (5,)
    assert len(record["grid"]) == 4 and 0 <= record["test_top1"] <= 100
    best = max(record["grid"], key=lambda row: row["holdout_top1"])
    assert (record["lr"], record["weight_decay"]) == (best["lr"], best["weight_decay"])
    assert "finetune test top-1:" in capsys.readouterr().out


def test_holdout_search_picks_the_pair_with_the_best_validation_accuracy(tmp_path):
    from supernet import finetune
    from supernet.runtime import Runtime

    scores = {(0.1, 0.0): 50.0, (0.1, 1e-4): 80.0, (0.3, 0.0): 70.0, (0.3, 1e-4): 60.0}
    fitted = []

    def fake_fit(base, classes, splits, config, runtime):
        lr = round(config.lr_per_256 * config.batch_size / 256, 6)
        fitted.append((lr, config.weight_decay, os.path.relpath(config.out, tmp_path), len(splits["train"])))
        return {"test_top1": scores.get((lr, config.weight_decay), 0.0), "model": base}

    base = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 10))
    train = torch.utils.data.TensorDataset(torch.randn(50, 3, 8, 8), torch.randint(0, 3, (50,)))
    config = finetune.FinetuneConfig(model="export:x", batch_size=16, out=str(tmp_path))
    result = finetune.finetune(base, train, train, train, 3, config, [0.1, 0.3], [0.0, 1e-4],
                               Runtime(0, 1, torch.device("cpu")), fit=fake_fit)
    assert (result["lr"], result["weight_decay"]) == (0.1, 1e-4)
    assert fitted[0] == (0.1, 0.0, "holdout/lr=0.1,wd=0", 40)  # 20% of 50 held out
    assert fitted[-1] == (0.1, 1e-4, "final", 50) and len(fitted) == 5  # four on the hold-out split, then the final run


def test_teacher_checkpoint_names_a_supernet_subnet(tmp_path):
    config = distill.resolve(values={"teacher_checkpoint": "/runs/a", "teacher_arch": "min"})
    assert distill.default_teacher(config) == "supernet:/runs/a:min"
    with pytest.raises(ValueError, match="not both"):
        distill.resolve(values={"teacher_checkpoint": "/runs/a", "teacher": "export:/x"})


# -- two processes equal one ------------------------------------------------------------------

class SmallMLP(torch.nn.Module):
    """No BN and no dropout: nothing couples the images of a batch, so two processes of 64 images per step
    compute exactly what one process of 128 does (up to the summation order)."""

    def __init__(self, classes: int):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 32), torch.nn.ReLU(),
                                          torch.nn.Linear(32, classes))

    def forward(self, images):
        return self.layers(images)


def small_mlp(spec, classes, seed=0, data_path=None):
    torch.manual_seed(seed + (1 if spec.endswith("teacher") else 0))
    return SmallMLP(classes)


def equivalence_config(out, batch_size):
    return distill.resolve(values={"student": "torchvision:student", "teacher": "torchvision:teacher", "epochs": "2",
                                   "batch_size": str(batch_size), "calib_images": "0", "device": "cpu",
                                   "log_every": "1", "out": out})


def _distill_process(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    models.build = small_mlp  # this spawned process's models
    # Through the command's own exit path: every process waits for the others before its process group goes.
    run_command("alphanet distill", lambda: distill.run_distill(equivalence_config(out, 128 // world)))


def test_two_processes_distill_as_one_process(tmp_path, monkeypatch):
    import socket

    import torch.multiprocessing as mp

    monkeypatch.setattr(models, "build", small_mlp)
    single = str(tmp_path / "one")
    one = distill.run_distill(equivalence_config(single, 128))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    double = str(tmp_path / "two")
    mp.spawn(_distill_process, args=(2, port, double), nprocs=2, join=True)
    steps = [[json.loads(line) for line in open(os.path.join(folder, "steps.jsonl"))] for folder in (single, double)]
    assert len(steps[0]) == len(steps[1]) == 2 * (1259 // 128)
    for a, b in zip(*steps):
        assert a["step"] == b["step"] and a["lr"] == b["lr"]
        for name in ("loss", "ce", "kd"):
            assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6)
    weights = [torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)["model"]
               for folder in (single, double)]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-4, atol=1e-5)
    summary = json.load(open(os.path.join(double, "summary.json")))
    assert summary["test_top1"] == pytest.approx(one["test_top1"], abs=0.3)  # 359 test images: one image apart


def test_a_torchvision_student_takes_a_width_multiplier():
    from supernet.flops import count_with_hooks

    full, narrow = (models.build(f"torchvision:mobilenet_v3_large{suffix}", 10) for suffix in ("", ":width=0.5"))
    assert count_with_hooks(narrow, 224) < 0.4 * count_with_hooks(full, 224)
    assert narrow.features[0][0].out_channels == 8 and full.features[0][0].out_channels == 16
    for spec, fragment in (("torchvision:resnet18:width=0.5", "takes no width multiplier"),
                           ("torchvision:mobilenet_v2:width=big", "width=W needs a multiplier")):
        with pytest.raises(ValueError, match=fragment):
            models.build(spec, 10)
