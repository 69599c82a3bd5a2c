"""How close a sparse (top-k) teacher is to the dense one: a tiny causal LM distilled with k = 8, 64 and the
full distribution, on generated data, measured against the teacher's full distribution on held-out tokens.

    python -m benchmarks.sparse_quality [--steps 300] [--topk 8 64] [--out results/sparse-quality]

Setup (CPU, no download): the teacher is a 2-layer Llama (hidden 64, vocabulary 512) made peaked by
scaling its head, the data are token sequences it generates itself (sampling at temperature 1), the student
a 2-layer Llama of hidden 48 trained with AdamW through `AdaptiveKDTrainer`'s loss (`causal_lm_adaptive_kd`,
`teacher_topk=k` for the sparse runs), same seed and batches for every run. Reported per run, on held-out
sequences: KL(teacher || student) over the full vocabulary, the student's top-1 agreement with the teacher, the
teacher's mass outside its top-k (what the tail bin holds), and the disk of a float16 cache of that k per
million tokens (measured: `cache_teacher` on the training data). Writes results.json and sparse_quality.png.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F


def tiny_llama(hidden: int, seed: int, head_scale: float, vocab: int = 512):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    return model


@torch.no_grad()
def generate(teacher, sequences: int, length: int, seed: int) -> torch.Tensor:
    """Token sequences sampled from the teacher (temperature 1), each from a random first token."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, teacher.config.vocab_size, (sequences, 1), generator=generator)
    for _ in range(length - 1):
        probs = torch.softmax(teacher(input_ids=tokens).logits[:, -1].float(), -1)
        tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], 1)
    return tokens


@torch.no_grad()
def evaluate(student, teacher, tokens: torch.Tensor, topk: List[int]) -> Dict[str, float]:
    lq = F.log_softmax(student(input_ids=tokens).logits.float(), -1)
    lp = F.log_softmax(teacher(input_ids=tokens).logits.float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    agreement = (lq.argmax(-1) == lp.argmax(-1)).float().mean().item()
    tails = {f"teacher_tail_k{k}": (1 - lp.exp().topk(k, -1).values.sum(-1)).mean().item() for k in topk}
    return dict(kl_teacher_student=kl, top1_agreement=agreement, **tails)


def distill(teacher, train: torch.Tensor, k: Optional[int], steps: int, batch: int, seed: int,
            held_out: torch.Tensor, topk: List[int]) -> Dict[str, object]:
    from alphadiv_kernels.integrations.transformers import causal_lm_adaptive_kd
    student = tiny_llama(48, seed=seed, head_scale=1.0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    curve, start = [], time.perf_counter()
    for step in range(steps):
        rows = torch.randint(0, train.shape[0], (batch,), generator=generator)
        inputs = dict(input_ids=train[rows], labels=train[rows])
        loss = causal_lm_adaptive_kd(student, teacher, inputs, teacher_topk=k).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % max(1, steps // 10) == 0:
            curve.append(dict(step=step + 1, **evaluate(student, teacher, held_out, topk)))
    return dict(k=k or "full", seconds=time.perf_counter() - start, curve=curve, final=curve[-1])


def cache_bytes_per_million_tokens(teacher, train: torch.Tensor, k: int) -> float:
    from alphadiv_kernels.integrations.teacher_cache import cache_teacher
    with tempfile.TemporaryDirectory() as folder:
        manifest = cache_teacher(teacher, [dict(input_ids=row.tolist()) for row in train], folder, k=k,
                                 dtype="float16", batch_size=32, progress=False)
        size = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)
                   if name.endswith(".safetensors"))
    return size / manifest["tokens"] * 1e6


def plot(runs: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        steps = [point["step"] for point in run["curve"]]
        label = f"k = {run['k']}" if run["k"] != "full" else "full distribution"
        axes[0].plot(steps, [point["kl_teacher_student"] for point in run["curve"]], marker="o", label=label)
        axes[1].plot(steps, [point["top1_agreement"] for point in run["curve"]], marker="o", label=label)
    axes[0].set(xlabel="step", ylabel="held-out KL(teacher || student), full vocabulary")
    axes[1].set(xlabel="step", ylabel="held-out top-1 agreement with the teacher")
    axes[0].legend()
    figure.suptitle("Distilling from the teacher's top-k vs its full distribution (tiny Llama, generated data)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sparse_quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--topk", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sequences", type=int, default=2048, help="generated training sequences (of 32 tokens)")
    parser.add_argument("--out", default=os.path.join("results", "sparse-quality"))
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.sequences < 1 or min(args.topk) < 1 or max(args.topk) > 512:
        raise SystemExit("python -m benchmarks.sparse_quality: error: --steps, --batch, --sequences >= 1 and --topk in "
                         "[1, 512]")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    teacher = tiny_llama(64, seed=0, head_scale=30.0).eval().requires_grad_(False)
    tokens = generate(teacher, args.sequences + 64, 32, seed=1)
    train, held_out = tokens[:args.sequences], tokens[args.sequences:]
    runs = []
    for k in [*args.topk, None]:
        run = distill(teacher, train, k, args.steps, args.batch, seed=2, held_out=held_out, topk=args.topk)
        if k is not None:
            run["cache_mb_per_million_tokens"] = cache_bytes_per_million_tokens(teacher, train, k) / 1e6
        runs.append(run)
        final = run["final"]
        disk = f"{run['cache_mb_per_million_tokens']:7.0f}" if k is not None else f"{'-':>7}"
        print(f"k={str(run['k']):>5}  KL {final['kl_teacher_student']:.4f}  top-1 {final['top1_agreement']:.3f}  "
              f"cache MB / 1M tokens {disk}  ({run['seconds']:.0f} s)", flush=True)
    tails = {k: runs[-1]["final"][f"teacher_tail_k{k}"] for k in args.topk}
    print("teacher mass outside its top-k (held-out mean): " + ", ".join(f"k={k}: {v:.4f}" for k, v in tails.items()))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(dict(settings=vars(args), runs=runs), handle, indent=1)
    plot(runs, os.path.join(args.out, "sparse_quality.png"))
    print(f"wrote {args.out}/results.json and sparse_quality.png")
    return runs


if __name__ == "__main__":
    main()
