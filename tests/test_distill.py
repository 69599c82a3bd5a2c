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

pytestmark = pytest.mark.skipif("cpu" not in ak.available_backends(), reason="CPU extension not built")
QUICK = {"epochs": "2", "teacher_epochs": "2", "batch_size": "128"}


@pytest.mark.parametrize("kd", ["adaptive", "kl"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_the_loss_is_one_minus_beta_ce_plus_beta_t_squared_kd(gen, kd, temperature):
    config = distill.resolve(values={"kd": kd, "kd_temperature": str(temperature), "beta": "0.7"})
    student, teacher = torch.randn(16, 10, generator=gen, dtype=torch.float64), torch.randn(16, 10, generator=gen,
                                                                                             dtype=torch.float64)
    labels = torch.randint(0, 10, (16,), generator=gen)
    got = distill.distill_loss(student, teacher, labels, config)["loss"]
    q, p = F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1)
    if kd == "kl":
        divergence = (p.exp() * (p - q)).sum(-1)
    else:  # max of the clipped alpha = -1 and alpha = 1 divergences (no clip active for alpha = 1)
        reverse = ((q.exp() * torch.clamp(torch.exp(-(p - q)), max=5.0)).sum(-1) - 1) / 2
        divergence = torch.maximum(reverse, (p.exp() * (p - q)).sum(-1))
    expected = 0.3 * F.cross_entropy(student, labels) + 0.7 * temperature**2 * divergence.mean()
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
def exported_subnet(tmp_path_factory):
    from supernet import train
    from supernet.config import resolve_config

    folder = tmp_path_factory.mktemp("export")
    config = resolve_config("digits", overrides={"epochs": "2", "batch_size": "128", "num_random_subnets": "0",
                                                 "calib_images": "256", "out": str(folder / "run")})
    train.run_training(config)
    cli_main(["export", "--checkpoint", config.out, "--arch", "max", "--out", str(folder / "export"),
              "--calib-images", "256"])
    return str(folder / "export")


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


def test_holdout_search_picks_the_pair_with_the_best_validation_accuracy(monkeypatch):
    from supernet import finetune

    scores = {(0.1, 0.0): 50.0, (0.1, 1e-4): 80.0, (0.3, 0.0): 70.0, (0.3, 1e-4): 60.0}
    fitted = []
    monkeypatch.setattr(finetune, "fit", lambda model, split, epochs, lr, wd, bs, seed, device:
                        (fitted.append((lr, wd)), (model, lr, wd))[1])
    monkeypatch.setattr(finetune, "top1", lambda fitted_model, split, device: scores[fitted_model[1:]]
                        if isinstance(fitted_model, tuple) else 0.0)
    base = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 10))
    train = torch.utils.data.TensorDataset(torch.randn(50, 3, 8, 8), torch.randint(0, 3, (50,)))
    result = finetune.finetune(base, train, train, 3, 1, 16, [0.1, 0.3], [0.0, 1e-4], holdout=0.2)
    assert (result["lr"], result["weight_decay"]) == (0.1, 1e-4)
    assert fitted[-1] == (0.1, 1e-4) and len(fitted) == 5  # four on the hold-out split, then the final run


def test_teacher_checkpoint_names_a_supernet_subnet(tmp_path):
    config = distill.resolve(values={"teacher_checkpoint": "/runs/a", "teacher_arch": "min"})
    assert distill.default_teacher(config) == "supernet:/runs/a:min"
    with pytest.raises(ValueError, match="not both"):
        distill.resolve(values={"teacher_checkpoint": "/runs/a", "teacher": "export:/x"})
