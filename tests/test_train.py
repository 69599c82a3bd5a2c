"""The supernet trainer: config, exact resume, kill-and-resume, distributed gradients, non-finite losses."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import alphadiv_kernels as ak
from supernet import checkpoint as ckpt
from supernet import distill, engine, finetune, train
from supernet.config import apply, config_for_resume, resolve_config
from supernet.errors import NonFiniteLossError

pytestmark = pytest.mark.skipif("cpu" not in ak.available_backends(), reason="CPU extension not built")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"epochs": "2", "batch_size": "128", "num_random_subnets": "1", "calib_images": "256"}


def small_config(tmp_path, name, **extra):
    return resolve_config("digits", overrides={**SMALL, "out": str(tmp_path / name), **extra})


def step_losses(run_dir):
    with open(os.path.join(run_dir, "steps.jsonl")) as handle:
        return [json.loads(line) for line in handle]


# -- configuration ----------------------------------------------------------------------------

def test_config_layers_preset_yaml_and_overrides(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("epochs: 7\nkd: kl\nchannels_last: true\n")
    config = resolve_config("digits", str(yaml_file), command_line(["--epochs", "3", "--lr-per-256=0.2"]))
    assert (config.epochs, config.kd, config.channels_last, config.lr_per_256) == (3, "kl", True, 0.2)
    flags = command_line(["--channels-last", "--amp", "bf16", "--kd_clip=2"])
    assert flags == {"channels_last": "true", "amp": "bf16", "kd_clip": "2"}
    imagenet = resolve_config("imagenet", overrides={"data_path": "/data/imagenet"})
    assert (imagenet.space, imagenet.epochs, imagenet.warmup_epochs, imagenet.batch_size, imagenet.calib_images,
            imagenet.amp, imagenet.bn_momentum) == ("alphanet", 360, 5, 32, 2048, "off", 0.0)


def command_line(tokens):
    from supernet.config import CommandLineParser, add_config_arguments, overrides

    parser = CommandLineParser(prog="alphanet train")
    add_config_arguments(parser)
    return overrides(parser.parse_args(tokens))


@pytest.mark.parametrize("overrides,message", [
    ({"epoch": "3"}, "unknown config key 'epoch'"),
    ({"epochs": "three"}, "'epochs' expects int"),
    ({"channels_last": "maybe"}, "'channels_last' expects true/false"),
    ({"kd": "js"}, "'kd' must be one of"),
    ({"dataset": "cifar10"}, "needs a data folder"),
])
def test_bad_config_keys_and_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_config("digits", overrides=overrides)


def test_missing_dataset_folder_is_a_clear_error(tmp_path):
    config = resolve_config("digits", overrides={"dataset": "cifar10", "data_path": str(tmp_path / "nowhere"),
                                                 "out": str(tmp_path / "run")})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train.run_training(config)


# -- checkpoints and resume, over both commands of the engine ------------------------------------

class Command:
    """One engine command in the tests: its config, its run function, its module and its summary; how
    its command line continues a run, and where the run folder lies under --out."""

    def __init__(self, name, module, make_config, resume_config, run, summary_line, cli_flags,
                 continue_argv=lambda argv, out: ["--resume", out], folder=lambda out: out):
        self.name, self.module, self.make_config, self.resume_config = name, module, make_config, resume_config
        self.run, self.summary_line, self.cli_flags = run, summary_line, cli_flags
        self.continue_argv, self.folder = continue_argv, folder


DISTILL_SMALL = {"epochs": "2", "batch_size": "128", "calib_images": "256", "teacher": "arch:digits:min",
                 "teacher_epochs": "1"}
COMMANDS = {
    "train": Command("train", "supernet.train", small_config, lambda out: config_for_resume(out),
                     train.run_training, "max subnet test top-1:", ["--num_random_subnets", "1"]),
    "distill": Command("distill", "supernet.distill",
                       lambda tmp_path, name, **extra: distill.resolve(values={**DISTILL_SMALL,
                                                                               "out": str(tmp_path / name), **extra}),
                       lambda out: distill.config_for_resume(out, {}), distill.run_distill, "student test top-1:",
                       ["--teacher", "arch:digits:min", "--teacher_epochs", "1"]),
    # one fine-tuning (no grid) of a fresh min subnet of the digits space on all ten classes
    "finetune": Command("finetune", "supernet.finetune",
                        lambda tmp_path, name, **extra: finetune_config(out=str(tmp_path / name), **extra),
                        lambda out: finetune.config_for_resume(out), finetune.run_single, "finetune test top-1:",
                        ["--model", "arch:digits:min", "--holdout", "0", "--lr", "0.1"],
                        continue_argv=lambda argv, out: argv, folder=lambda out: os.path.join(out, "final")),
}


def finetune_config(**values):
    config = apply(finetune.FinetuneConfig(), {"model": "arch:digits:min", "epochs": "2", "batch_size": "128",
                                               "calib_images": "256", **values}, "the test")
    finetune.validate(config)
    return config


@pytest.fixture(params=list(COMMANDS))
def command(request):
    return COMMANDS[request.param]


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "2-persistent-workers"])
def test_resume_from_a_mid_run_checkpoint_reproduces_the_losses_bit_for_bit(tmp_path, workers, command):
    straight = command.make_config(tmp_path, "straight")
    command.run(straight)
    # the interrupted run loads with worker processes (one DataLoader kept across epochs): same batches
    interrupted = command.make_config(tmp_path, "interrupted", workers=str(workers))
    assert command.run(interrupted, stop_at_step=5)["stopped"]
    command.run(command.resume_config(interrupted.out), resume=interrupted.out)
    expected, resumed = step_losses(straight.out), step_losses(interrupted.out)
    assert [r["step"] for r in resumed] == list(range(1, len(expected) + 1))
    assert resumed == expected  # every loss and the lr of every step, exactly


def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint(tmp_path, command):
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", command.module, "--epochs", "3", "--batch_size", "128", *command.cli_flags,
            "--calib_images", "256", "--checkpoint_every", "2", "--out", str(out)]
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(os.path.join(command.folder(str(out)), "checkpoint.pt")):
        time.sleep(0.2)
    time.sleep(1.0)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    folder = command.folder(str(out))
    killed_at = ckpt.load(folder)["step"]  # whole, whichever moment the kill came
    assert killed_at >= 2
    done = subprocess.run([sys.executable, "-m", command.module, *command.continue_argv(argv[3:], str(out))],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert command.summary_line in done.stdout
    assert ckpt.load(folder)["step"] == 3 * 9
    assert [r["step"] for r in step_losses(folder)] == list(range(1, 3 * 9 + 1))
    assert os.path.exists(os.path.join(folder, "curves.png")) and os.path.exists(os.path.join(folder, "config.yaml"))


def test_non_finite_losses_skip_steps_then_stop_keeping_a_good_checkpoint(tmp_path, monkeypatch, command):
    config = command.make_config(tmp_path, "nan", checkpoint_every="2", max_nonfinite_steps="3")
    task = {"train": train.SupernetTask, "distill": distill.DistillTask, "finetune": finetune.FinetuneTask}[command.name]
    original = task.step
    calls = {"n": 0}

    def poisoned(self, run, *args):
        losses = original(self, run, *args)
        if getattr(self, "role", "student") != "student":  # the teacher trained first stays healthy
            return losses
        calls["n"] += 1
        if calls["n"] > 3:
            for param in self.model.parameters():
                if param.grad is not None:
                    param.grad.fill_(float("nan"))
            losses = {key: value * float("nan") for key, value in losses.items()}
        return losses

    monkeypatch.setattr(task, "step", poisoned)
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        command.run(config)
    state = ckpt.load(config.out)
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values() if tensor.is_floating_point())


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def test_step_loop_reads_the_device_at_most_once_per_log_every_steps(tmp_path, monkeypatch, command):
    """Each of these calls waits for the GPU when the tensor is there; counted here on CPU tensors, leaving
    out the DataLoader's own host tensors (the epoch's order, the workers' base seed). The op's backward
    reads its incoming gradient only on CPU, where that costs nothing: made to behave as on a GPU here."""
    from alphadiv_kernels import adaptive_kd

    config = command.make_config(tmp_path, "syncs", epochs="1", batch_size="64", log_every="5")
    module = {"train": train, "distill": distill, "finetune": finetune}[command.name]
    run = module.setup(config, None, train.Runtime(0, 1, torch.device("cpu")))
    run.model.train()
    monkeypatch.setattr(adaptive_kd, "_is_exactly_one", lambda grad_loss: False)
    reads = []

    def counted(name, original):
        def read(self, *args, **kwargs):
            callers = [frame.filename for frame in traceback.extract_stack()[:-1]]
            if not any(os.path.join("torch", "utils", "data") in caller for caller in callers):
                reads.append(f"{name} from {callers[-1]}")
            return original(self, *args, **kwargs)
        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    engine.train_epoch(run, None, lambda: False)
    monkeypatch.undo()
    run.close()
    assert run.steps_per_epoch == 19 and run.step == 19
    assert len(reads) <= -(-19 // 5), reads  # steps 5, 10, 15 and the epoch's end
    assert [record["step"] for record in step_losses(config.out)] == list(range(1, 20))
    assert run.epoch_sums["steps"] == 19


def test_a_non_finite_step_changes_no_weight_and_no_momentum_and_a_streak_freezes_the_weights():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    config = resolve_config("digits")
    optimizer = engine.make_optimizer(model, config, 256)
    guard = engine.StepGuard(limit=2, device=torch.device("cpu"))
    snapshot = lambda: [t.clone() for t in [*model.parameters(), *(optimizer.state[p]["momentum_buffer"]  # noqa
                                                                   for p in model.parameters())]]

    def step(number, poison=None):
        loss = model(torch.randn(8, 4)).square().mean()
        loss.backward()
        losses = {"ce": loss.detach() * (float("nan") if poison == "loss" else 1.0)}
        flat = engine.all_reduce_gradients(list(model.parameters()), train.Runtime(0, 1, torch.device("cpu")), losses)
        if poison == "grad":
            flat[0] = float("inf")
        optimizer.found_inf = guard.check(list(losses), flat, number, 0.1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(1, "grad")  # a skipped first step: the momentum stays zero, not uninitialised
    assert all(torch.equal(t, torch.zeros_like(t)) for t in snapshot()[-4:])
    step(2)
    before = snapshot()
    step(3, "loss")
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot()))
    step(4)
    assert not all(torch.equal(a, b) for a, b in zip(before, snapshot()))
    records = guard.flush()
    assert [(r["step"], r["skipped"]) for r in records] == [(1, True), (2, False), (3, True), (4, False)]
    assert guard.halted_at is None and torch.isnan(torch.tensor(records[2]["ce"]))
    frozen = snapshot()
    step(5, "grad"), step(6, "loss"), step(7), step(8)  # two in a row: the run halts at step 6
    assert all(torch.equal(a, b) for a, b in zip(frozen, snapshot()))
    assert [r["step"] for r in guard.flush()] == [5] and guard.halted_at == 6


# -- distributed ------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        config = resolve_config("digits", overrides={"num_random_subnets": "2"})
        from supernet.data import digits_splits
        from supernet.model import ElasticSupernet
        from supernet.space import DIGITS

        images, labels = digits_splits()["train"].tensors
        shard = slice(rank * 32, (rank + 1) * 32)  # each rank its own data
        torch.manual_seed(0)
        model = ElasticSupernet(DIGITS)
        params = list(model.parameters())
        subnets = train.sample_subnets(DIGITS, config.seed, step=11, count=2)
        runtime = train.Runtime(rank, world, torch.device("cpu"))
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        engine.seed_step(config.seed, rank, 11)
        train.sandwich_backward(model, images[shard], labels[shard], subnets, config,
                                __import__("contextlib").nullcontext, scaler)
        local = torch._utils._flatten_dense_tensors(
            [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]).clone()
        calls = {"all_reduce": 0}
        real_all_reduce = dist.all_reduce

        def counting_all_reduce(*args, **kwargs):
            calls["all_reduce"] += 1
            return real_all_reduce(*args, **kwargs)

        dist.all_reduce = counting_all_reduce
        try:
            reduced = engine.all_reduce_gradients(params, runtime, {"ce": torch.tensor(rank + 1.0)}).clone()
        finally:
            dist.all_reduce = real_all_reduce
        gathered_subnets = [None] * world
        dist.all_gather_object(gathered_subnets, subnets)
        locals_ = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(locals_, local)
        results[rank] = {"subnets_equal": all(s == subnets for s in gathered_subnets),
                         "reduced": reduced, "mean_of_locals": torch.stack(locals_).mean(0),
                         "all_reduce_calls": calls["all_reduce"]}
        dist.barrier()  # both processes leave together: gloo can abort a process whose peer tears down first
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_sample_the_same_subnets_and_average_gradients_in_one_all_reduce():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_distributed_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    first, second = results[0], results[1]
    assert first["subnets_equal"] and second["subnets_equal"]
    assert first["all_reduce_calls"] == 1 and second["all_reduce_calls"] == 1
    assert torch.equal(first["reduced"], second["reduced"])
    torch.testing.assert_close(first["reduced"][:-1], first["mean_of_locals"], rtol=1e-6, atol=1e-7)
    assert first["reduced"][-1] == 1.5  # the losses ride in the same all-reduce: (1 + 2) / 2
    assert not torch.equal(results[0]["mean_of_locals"], torch.zeros_like(results[0]["mean_of_locals"]))


def _calibrated_evaluation(rank: int, world: int):
    """calibrated_accuracy of one subnet of a fixed supernet, and its BN statistics afterwards."""
    import random

    from supernet.data import digits_splits
    from supernet.evaluation import Calibration, calibrated_metrics, shard
    from supernet.model import ElasticSupernet
    from supernet.space import DIGITS

    torch.set_num_threads(1)
    config = resolve_config("digits", overrides={"calib_images": "200", "batch_size": "32", "eval_batch_size": "50"})
    torch.manual_seed(0)
    model = ElasticSupernet(DIGITS)
    splits = digits_splits()
    loader = torch.utils.data.DataLoader(shard(splits["val"], rank, world), batch_size=config.eval_batch_size)
    calibration = Calibration(splits["train"], config.calib_images, config.batch_size, config.seed)
    subnet = DIGITS.random_config(random.Random(3))
    metrics = calibrated_metrics(model, loader, calibration, train.Runtime(rank, world, torch.device("cpu")),
                                 forward=lambda x: model(x, subnet))
    statistics = {name: buffer.clone() for name, buffer in model.named_buffers() if "running" in name}
    return metrics, statistics, len(loader.dataset)


def _evaluation_worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = _calibrated_evaluation(rank, world)
        dist.barrier()  # both processes leave together: gloo can abort a process whose peer tears down first
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_calibrate_and_evaluate_as_one_process():
    single_metrics, single_statistics, _ = _calibrated_evaluation(0, 1)
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_evaluation_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    assert results[0][2] + results[1][2] == 179 and results[0][2] != 179  # each evaluated its own shard
    for rank in (0, 1):
        metrics, statistics, _ = results[rank]
        assert metrics["top1"] == single_metrics["top1"] and metrics["top5"] == single_metrics["top5"]
        assert metrics["loss"] == pytest.approx(single_metrics["loss"], rel=1e-6)
        for name, expected in single_statistics.items():  # 7 calibration batches: 4 on rank 0, 3 on rank 1
            torch.testing.assert_close(statistics[name], expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.all(t == 0) for name, t in single_statistics.items() if "mean" in name)


def test_torchrun_two_processes_end_to_end(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "supernet.train", "--epochs", "1", "--batch_size", "64", "--num_random_subnets", "1",
               "--calib_images", "256", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    assert "max subnet test top-1:" in done.stdout
    assert ckpt.load(str(out))["step"] == 1257 // 2 // 64


# -- the folder datasets, on small files made here --------------------------------------------

def write_fake_cifar(root, per_batch=20):
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": torch.randint(0, 256, (per_batch, 3072), generator=generator, dtype=torch.uint8).numpy(),
                 b"labels": torch.randint(0, 10, (per_batch,), generator=generator).tolist()}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)


def test_cifar10_folder_loads_and_trains(tmp_path):
    from supernet.data import load_splits

    write_fake_cifar(tmp_path / "cifar")
    splits = load_splits("cifar10", str(tmp_path / "cifar"), 32)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (90, 10, 20)
    image, label = splits["train"][0]
    assert image.shape == (3, 32, 32) and 0 <= int(label) < 10
    config = resolve_config("digits", overrides={"dataset": "cifar10", "data_path": str(tmp_path / "cifar"),
                                                 "space": "tiny", "epochs": "1", "batch_size": "32",
                                                 "num_random_subnets": "1", "calib_images": "32",
                                                 "out": str(tmp_path / "run")})
    summary = train.run_training(config)
    assert summary["step"] == 2 and 0 <= summary["test_top1_max"] <= 100
    (tmp_path / "cifar" / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(FileNotFoundError, match="test_batch.*malformed"):
        load_splits("cifar10", str(tmp_path / "cifar"), 32)


def test_imagefolder_loads_train_val_and_falls_back_to_val_for_test(tmp_path):
    from PIL import Image

    from supernet.data import load_splits, num_classes

    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (tmp_path / "images" / split / label).mkdir(parents=True)
            for index in range(3):
                Image.new("RGB", (40, 30), (index * 40, 100, 200)).save(tmp_path / "images" / split / label / f"{index}.png")
    splits = load_splits("imagefolder", str(tmp_path / "images"), 32)
    assert num_classes("imagefolder", splits) == 2 and splits["test"] is splits["val"]
    # uint8 bytes, channels last; normalised into [N, 3, H, W] float32 on the device (to_device)
    assert splits["train"][0][0].shape == (32, 32, 3) and splits["val"][5][1] == 1
    assert splits["train"][0][0].dtype == torch.uint8
    with pytest.raises(FileNotFoundError, match="val/"):
        (tmp_path / "broken" / "train").mkdir(parents=True)
        load_splits("imagefolder", str(tmp_path / "broken"), 32)


def test_profile_prints_the_split_of_a_step_and_writes_the_trace(tmp_path, capsys):
    out = tmp_path / "profiled"
    train.main(["--profile", "3", "--epochs", "2", "--batch_size", "128", "--num_random_subnets", "1",
                "--calib_images", "256", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "profile of steps 1-3 on cpu" in printed
    rows = {line.split("  ")[1].strip(): line for line in printed.splitlines() if line.startswith("  ")}
    for phase in ("data wait", "forward", "backward", "all-reduce", "optimizer", "logging (host sync)", "other"):
        assert any(key.startswith(phase) for key in rows), phase
    forward = float(next(line for key, line in rows.items() if key.startswith("forward")).split()[1])
    assert forward > 0
    assert json.load(open(out / "profile_trace.json"))["traceEvents"]
    assert len(step_losses(out)) == 3 and os.path.exists(out / "checkpoint.pt")  # stopped with a checkpoint


# -- attentive sampling (AttentiveNAS BestUp / WorstUp) ------------------------------------------

@pytest.mark.parametrize("choice", ["best", "worst"])
def test_attentive_sampling_keeps_the_best_or_worst_of_k_flops_matched_candidates(choice):
    import contextlib
    import random

    import torch.nn.functional as F

    from supernet.data import digits_splits
    from supernet.flops import mflops
    from supernet.model import ElasticSupernet
    from supernet.space import DIGITS

    config = resolve_config("digits", overrides={"sampler": "attentive", "attentive_choice": choice,
                                                 "attentive_candidates": "4", "num_random_subnets": "2"})
    torch.manual_seed(0)
    model = ElasticSupernet(DIGITS)
    images, labels = digits_splits()["train"].tensors
    images, labels = images[:64], labels[:64]
    runtime = train.Runtime(0, 1, torch.device("cpu"))
    chosen = train.attentive_subnets(model, images, labels, config, 7, runtime, contextlib.nullcontext)
    assert chosen == train.attentive_subnets(model, images, labels, config, 7, runtime, contextlib.nullcontext)
    for slot, subnet in enumerate(chosen):
        rng = random.Random(f"alphanet-attentive/{config.seed}/7/{slot}")
        candidates = train.flops_matched_candidates(DIGITS, rng, 4)
        with torch.no_grad():
            losses = [F.cross_entropy(model(images, arch), labels, label_smoothing=0.1).item() for arch in candidates]
        pick = min if choice == "best" else max
        assert subnet == candidates[losses.index(pick(losses))]
        flops = [mflops(DIGITS, arch) for arch in candidates]
        low, high = mflops(DIGITS, DIGITS.min_config()), mflops(DIGITS, DIGITS.max_config())
        assert max(flops) - min(flops) <= (high - low) / train.ATTENTIVE_FLOPS_BINS + 1e-9  # one FLOPs bin


def test_a_run_with_attentive_sampling_trains(tmp_path):
    config = small_config(tmp_path, "attentive", epochs="1", sampler="attentive", attentive_candidates="2")
    summary = train.run_training(config)
    assert summary["step"] == 9 and 0 <= summary["test_top1_min"] <= 100


def test_adaptive_kd_diagnostics_are_logged_per_step_and_per_epoch(tmp_path):
    config = small_config(tmp_path, "stats", epochs="1")
    train.run_training(config)
    steps = step_losses(config.out)
    shares = [(step["kd_alpha_min_share"], step["kd_clip_share"]) for step in steps]
    assert all(0 <= a <= 1 and 0 <= c <= 1 for a, c in shares) and any(a > 0 for a, _ in shares)
    with open(os.path.join(config.out, "metrics.jsonl")) as handle:
        epoch = json.loads(handle.readline())
    assert epoch["train_kd_alpha_min_share"] == pytest.approx(sum(a for a, _ in shares) / len(shares))
    assert epoch["train_kd_clip_share"] == pytest.approx(sum(c for _, c in shares) / len(shares))
    with open(os.path.join(config.out, "metrics.csv")) as handle:
        assert {"train_kd_alpha_min_share", "train_kd_clip_share"} <= set(handle.readline().strip().split(","))
    kl = small_config(tmp_path, "kl", epochs="1", kd="kl")
    train.run_training(kl)
    assert "kd_clip_share" not in step_losses(kl.out)[0]
