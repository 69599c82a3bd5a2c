"""Every command the README shows, run as a user types it.

The README's `bash` blocks are parsed; each `alphanet`, `python -m benchmarks` and `torchrun` command
in them must have a recipe here (a README command no test runs fails `test_every_readme_command_has_a_recipe`),
and each recipe runs its command in a fresh working directory as a separate process, verbatim, with
only size keys appended (epochs, seeds, batch and calibration sizes, shapes, repeats; argparse lets the
last value of a key win) and placeholders (`RUN_DIR`, `EXPORT_DIR`, `/data/imagenet`) pointing at small
stand-ins made here. It checks the exit code, what the README says is printed, and the files the
README says the command writes, where it writes them by default.
"""
from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Tuple

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
PROGRAMS = ("alphanet ", "python -m benchmarks", "torchrun ")
TIMEOUT_S = 600


def readme_commands(text: str) -> List[str]:
    """The commands of the README's bash blocks, continuation lines joined and comments removed."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            command = re.split(r"\s+#", line, maxsplit=1)[0].strip()
            if command.startswith(PROGRAMS) and command not in commands:
                commands.append(command)
    return commands


@dataclass(frozen=True)
class Recipe:
    size: str = ""  # size keys appended to the command
    needs: Tuple[str, ...] = ()  # stand-ins made in the working directory: run, slim_run, export, imagenet, ...
    writes: Tuple[str, ...] = ()  # globs (relative to the working directory) that must exist afterwards
    prints: str = ""  # text the output must contain
    gpu: bool = False  # without a GPU: must fail with one line saying so


TRAIN_FILES = ("checkpoint.pt", "config.yaml", "steps.jsonl", "metrics.csv", "curves.png", "summary.txt",
               "summary.json")
ABLATION_FILES = tuple(f"runs/ablation-*/ablation.{suffix}" for suffix in ("md", "csv", "json", "png"))
BENCH_FILES = tuple(f"results/cpu-*/results.{suffix}" for suffix in ("csv", "md", "png"))
TINY_BENCH = " --shapes 16x100 --repeats 3 --budget 0.05"
IMAGENET_SIZE = " --epochs 1 --batch_size 4 --eval_batch_size 8 --calib_images 8 --workers 0 --image_size 32"
DISTILL_SIZE = " --epochs 1 --teacher_epochs 1"


def train_files(folder: str) -> Tuple[str, ...]:
    return tuple(f"{folder}/{name}" for name in TRAIN_FILES)


RECIPES: Dict[str, Recipe] = {
    # Install, quick start
    "alphanet train": Recipe(" --epochs 1", writes=train_files("runs/digits-*"), prints="min subnet test top-1"),
    "alphanet flops --arch min": Recipe(prints="203.4 MFLOPs, 8.95 M parameters"),
    # Benchmarks
    "python -m benchmarks": Recipe(TINY_BENCH, writes=BENCH_FILES, prints="fused-cpu"),
    "python -m benchmarks --full": Recipe(TINY_BENCH + " --no-memory", writes=BENCH_FILES),
    "python -m benchmarks --shapes 2048x1000 512x32000 --modes fwd+bwd --repeats 21":
        Recipe(TINY_BENCH + " --no-memory", writes=BENCH_FILES),
    "python -m benchmarks --device cuda": Recipe(TINY_BENCH, gpu=True, writes=("results/cuda-*/results.csv",)),
    "python -m benchmarks --suite lm":
        Recipe(" --linear-shapes 32x16x200 --repeats 3 --budget 0.05 --no-memory",
               writes=("results/lm-cpu-*/results.json",)),
    "python -m benchmarks --suite data": Recipe(" --data-images 64", writes=("results/data-*/results.json",)),
    "python -m benchmarks.sparse_quality": Recipe(" --steps 4 --sequences 8 --topk 8", prints="teacher mass outside",
                                                  writes=("results/sparse-quality/results.json",
                                                          "results/sparse-quality/sparse_quality.png")),
    # Training
    "alphanet train --help": Recipe(prints="--kd_temperature"),
    "torchrun --standalone --nproc_per_node=2 -m supernet.train --epochs 5":
        Recipe(" --epochs 1 --calib_images 128", writes=train_files("runs/digits-*"), prints="2 process(es)"),
    # Evaluation, search and export
    "alphanet eval   --checkpoint RUN_DIR --arch random:2 --split test --out results.json":
        Recipe(needs=("run",), writes=("results.json",), prints="test top-1"),
    "alphanet search --checkpoint RUN_DIR": Recipe(" --iterations 1", needs=("run",),
                                                  writes=("RUN_DIR/search/pareto.json", "RUN_DIR/search/pareto.png")),
    "torchrun --standalone --nproc_per_node=2 -m supernet.search --checkpoint RUN_DIR":
        Recipe(" --iterations 1", needs=("run",), writes=("RUN_DIR/search/pareto.json",), prints="front:"),
    "alphanet export --checkpoint RUN_DIR --arch min --out exported":
        Recipe(needs=("run",), writes=("exported/model.pt2", "exported/weights.pt", "exported/arch.json")),
    "alphanet flops  --arch a4": Recipe(prints="443.5 MFLOPs, 11.81 M parameters"),
    "alphanet latency --space alphanet --device cpu --batch_size 1 --threads 2 --out latency/alphanet-cpu.json "
    "--validate 50": Recipe(" --quick --validate 2", prints="rank correlation with measured latency",
                            writes=("latency/alphanet-cpu.json", "latency/alphanet-cpu_validation.json")),
    "alphanet latency --space digits --quick --out latency/digits.json":
        Recipe(writes=("latency/digits.json",), prints="228 parts"),
    "alphanet search  --checkpoint RUN_DIR --latency_table latency/digits.json --max_latency_ms 10":
        Recipe(" --iterations 1", needs=("run", "digits_latency"), prints="measured:",
               writes=("RUN_DIR/search/pareto.json", "RUN_DIR/search/latency_report.json")),
    # Slimmable networks
    "alphanet train --preset slim-digits": Recipe(" --epochs 1", writes=train_files("runs/digits-*") + (
        "runs/digits-*/widths.csv", "runs/digits-*/widths.png")),
    "alphanet train --preset slim-digits --space slim_mbv1_digits --kd kl --kd_temperature 2":
        Recipe(" --epochs 1", writes=train_files("runs/digits-*")),
    "alphanet train --preset slim-imagenet --data_path /data/imagenet":
        Recipe(IMAGENET_SIZE, needs=("imagenet",), writes=train_files("runs/imagefolder-*")),
    "alphanet eval   --checkpoint RUN_DIR --widths 0.35:1.0:0.05 --split test --out widths.json":
        Recipe(needs=("slim_run",), writes=("widths.json", "widths.csv", "widths.png")),
    "alphanet flops  --space slim_mbv1 --width 0.25": Recipe(prints="41.0 MFLOPs, 0.47 M parameters"),
    "alphanet export --checkpoint RUN_DIR --width 0.5 --out mbv2_050":
        Recipe(needs=("slim_run",), writes=("mbv2_050/model.pt2", "mbv2_050/arch.json")),
    # Distillation and fine-tuning
    "alphanet distill": Recipe(DISTILL_SIZE, writes=("runs/distill-digits-*/summary.txt",
                                                     "runs/distill-digits-*/teacher/summary.txt"),
                               prints="teacher test top-1"),
    "alphanet distill --kd kl --kd_temperature 4": Recipe(DISTILL_SIZE, writes=("runs/distill-digits-*/summary.txt",)),
    "alphanet distill --teacher_checkpoint RUN_DIR --teacher_arch max --cache_teacher":
        Recipe(" --epochs 1", needs=("run",), writes=("runs/distill-digits-*/checkpoint.pt",
                                                       "runs/distill-digits-*/summary.txt")),
    "alphanet distill --preset imagenet --data_path /data/imagenet --teacher torchvision:resnet50:resnet50.pth "
    "--student torchvision:mobilenet_v3_large":
        Recipe(IMAGENET_SIZE.replace(" --calib_images 8", ""), needs=("imagenet", "resnet50"),
               writes=("runs/distill-imagefolder-*/summary.txt",)),
    "alphanet finetune --model export:EXPORT_DIR --classes 0,1,2,3,4 --out ft":
        Recipe(" --epochs 1", needs=("export",), writes=("ft/finetune.json", "ft/weights.pt")),
    # The paper's comparisons: two seeds where the README promises intervals, one elsewhere; two runs at a time
    "alphanet ablate --grid kd=none,kl,adaptive --seeds 0,1,2 --quick":
        Recipe(" --seeds 0,1 --epochs 1 --jobs 2", writes=ABLATION_FILES),
    "alphanet ablate --grid kd=none,kl,adaptive --seeds 0,1,2": Recipe(" --seeds 0 --epochs 1 --jobs 2",
                                                                      writes=ABLATION_FILES),
    "alphanet ablate --grid kd=kl kd_temperature=0.5,1,2,4 --seeds 0,1,2":
        Recipe(" --seeds 0 --epochs 1 --jobs 2", writes=ABLATION_FILES),
    "alphanet ablate --grid kd_clip=1,2,5,10 alphas=-1:1,-0.5:0.5,-2:2 --seeds 0,1,2":
        Recipe(" --seeds 0 --epochs 1 --jobs 2", writes=ABLATION_FILES),
    "alphanet ablate --preset digits --grid kd=none,kl,adaptive --seeds 0,1 --epochs 10":
        Recipe(" --seeds 0 --epochs 1 --jobs 2", writes=ABLATION_FILES),
    "alphanet ablate --grid kd=kl,symmetric,adaptive --seeds 0,1,2 --quick":
        Recipe(" --seeds 0 --epochs 1 --jobs 2", writes=ABLATION_FILES),
    "alphanet ablate --grid sampler=uniform,attentive kd=kl --seeds 0,1,2 --quick":
        Recipe(" --seeds 0 --epochs 1 --jobs 2", writes=ABLATION_FILES),
    "alphanet ablate --grid kd=kl,symmetric,adaptive --seeds 0,1,2,3,4,5,6,7,8,9":
        Recipe(" --seeds 0 --epochs 1 --jobs 2", writes=ABLATION_FILES),
    "alphanet ablate --grid kd=kl,adaptive --seeds 0,1 --quick --boxplot 20":
        Recipe(" --seeds 0 --epochs 1 --jobs 2 --boxplot 2 --calib_images 64",
               writes=ABLATION_FILES + ("runs/ablation-*/groups.png", "runs/ablation-*/groups.csv")),
    "alphanet boxplot --checkpoint RUN_DIR --per_group 20 --out boxes":
        Recipe(" --per_group 2 --calib_images 64", needs=("run",), writes=("boxes/groups.png", "boxes/groups.csv"),
               prints="wrote boxes/groups.png"),
    # Published models
    "alphanet convert alphanet_pretrained.pth.tar alphanet.pt --data_path /data/imagenet":
        Recipe(needs=("imagenet", "reference_checkpoint"), writes=("alphanet.pt",)),
    "alphanet eval --checkpoint alphanet.pt --arch a0 --split val": Recipe(" --calib-images 64", needs=("converted",),
                                                                          prints="val top-1"),
}


def test_every_readme_command_has_a_recipe():
    with open(README, encoding="utf-8") as handle:
        commands = readme_commands(handle.read())
    assert len(commands) >= 20, "the README's bash blocks were not parsed"
    untested = [command for command in commands if command not in RECIPES]
    assert not untested, f"README commands that no test runs (add a recipe): {untested}"
    stale = [command for command in RECIPES if command not in commands]
    assert not stale, f"recipes of commands the README no longer shows: {stale}"


def test_readme_commands_parse_continuations_and_comments():
    text = "```bash\nalphanet a --x 1   # note\n  # more\nalphanet b \\\n   --y 2\npip install x\n```\n" \
           "```text\nalphanet c [--z]\n```\n"
    assert readme_commands(text) == ["alphanet a --x 1", "alphanet b --y 2"]


# ---------------------------------------------------------------------------------------------
# Stand-ins the commands need, made once and copied into each working directory


def _cli(argv: List[str]) -> None:
    from supernet.cli import main

    main(argv)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Made on first use: a digits run, a slimmable digits run, an export, a tiny ImageFolder (two classes),
    and one with ImageNet's 1000 classes (one small image each) for the converted reference supernet."""
    root = tmp_path_factory.mktemp("stand_ins")
    made: Dict[str, str] = {}

    def get(name: str) -> str:
        if name in made:
            return made[name]
        path = str(root / name)
        if name == "run":
            _cli(["train", "--epochs", "1", "--calib_images", "128", "--out", path])
        elif name == "slim_run":
            _cli(["train", "--preset", "slim-digits", "--epochs", "1", "--calib_images", "128", "--out", path])
        elif name == "export":
            _cli(["export", "--checkpoint", get("run"), "--arch", "min", "--out", path])
        elif name == "imagenet":
            from benchmarks.data_pipeline import make_jpeg_folder

            train = make_jpeg_folder(path, 12)
            shutil.copytree(train, os.path.join(path, "val"))
        elif name == "imagenet1k":
            from PIL import Image

            for index in range(1000):
                os.makedirs(os.path.join(path, "train", f"n{index:04d}"))
                Image.new("RGB", (40, 32), (index % 256, index // 4, 99)).save(
                    os.path.join(path, "train", f"n{index:04d}", "image.jpg"))
            shutil.copytree(os.path.join(path, "train"), os.path.join(path, "val"))
        made[name] = path
        return path

    return get


def prepare(needs: Tuple[str, ...], stand_ins, cwd: str) -> Dict[str, str]:
    """Placeholders of the command -> paths, with the stand-ins it needs in `cwd`."""
    placeholders: Dict[str, str] = {}
    for need in needs:
        if need in ("run", "slim_run"):
            shutil.copytree(stand_ins(need), os.path.join(cwd, "RUN_DIR"))
            placeholders["RUN_DIR"] = "RUN_DIR"
        elif need == "export":
            placeholders["EXPORT_DIR"] = stand_ins("export")
        elif need == "digits_latency":
            _cli(["latency", "--space", "digits", "--quick", "--out", os.path.join(cwd, "latency", "digits.json")])
        elif need == "imagenet":
            placeholders["/data/imagenet"] = stand_ins("imagenet")
        elif need == "resnet50":
            import torchvision

            torch.save(torchvision.models.resnet50(num_classes=2).state_dict(), os.path.join(cwd, "resnet50.pth"))
        elif need in ("reference_checkpoint", "converted"):
            from test_reference_fidelity import reference_weights, write_reference_checkpoint

            write_reference_checkpoint(os.path.join(cwd, "alphanet_pretrained.pth.tar"), reference_weights(seed=3))
            if need == "converted":
                _cli(["convert", os.path.join(cwd, "alphanet_pretrained.pth.tar"), os.path.join(cwd, "alphanet.pt"),
                      "--data-path", stand_ins("imagenet1k")])
    return placeholders


def argv_of(command: str) -> List[str]:
    """The command's words, its program resolved in this environment (the venv's entry points)."""
    words = shlex.split(command)
    if words[0] == "python":
        return [sys.executable] + words[1:]
    program = shutil.which(words[0]) or os.path.join(os.path.dirname(sys.executable), words[0])
    return [program] + words[1:]


@pytest.mark.parametrize("command", list(RECIPES))
def test_readme_command_runs_as_written(command, stand_ins, tmp_path):
    recipe = RECIPES[command]
    cwd = str(tmp_path)
    text = command
    for placeholder, path in prepare(recipe.needs, stand_ins, cwd).items():
        text = text.replace(placeholder, shlex.quote(path))
    environment = {**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"}  # benchmarks/ runs from the clone
    done = subprocess.run(argv_of(text + recipe.size), cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    output = done.stdout + done.stderr
    if recipe.gpu and not torch.cuda.is_available():
        assert done.returncode != 0 and "no CUDA device" in done.stderr, output[-2000:]
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        return
    assert done.returncode == 0, f"{command!r} exited {done.returncode}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    assert recipe.prints in output, output[-3000:]
    missing = [pattern for pattern in recipe.writes if not glob.glob(os.path.join(cwd, pattern))]
    assert not missing, f"{command!r} did not write {missing}; the folder holds {sorted(os.listdir(cwd))}"
    leftovers = glob.glob(os.path.join(cwd, "**", "*.partial"), recursive=True)
    assert not leftovers, f"temporary files left behind: {leftovers}"

