"""Distilling a causal language model with `transformers`: the adaptive alpha-divergence through each
model's `lm_head`, fused, so no `[tokens, vocab]` logits are ever held.

Per step, for a student S and a frozen teacher T that share the vocabulary:

    h_S = S's final hidden states (the forward goes through the caller's module: DDP's, when wrapped)
    h_T = T's final hidden states, under no_grad, once
    loss = [ sum_i kd(h_S,i W_S^T, h_T,i W_T^T) + ce_weight * sum_i CE(h_S,i W_S^T, y_i+1) ] / n

over the distilled positions i: a position counts when its own token is attended (attention_mask) and
the token it predicts has a label other than -100 (`labels[:, i + 1]`, or `shift_labels[:, i]` from a
padding-free collator). `kd` is `fused_linear_adaptive_kd` (temperature T divides both logits and
multiplies the value by T^2), CE the hard-label cross-entropy (only computed when ce_weight > 0).
n is the number of distilled positions in the whole optimizer step: every micro-batch of gradient
accumulation and, with `average_tokens_across_devices`, every process (the Trainer's
`num_items_in_batch`, counted here with the same rule as the mask), so 1 x 8 and 8 x 1 accumulation
train the same objective. Without it, n is this batch's count.

The models run with `logits_to_keep` = no positions, so their own `lm_head` projects nothing; a
forward hook on the decoder (`model.get_decoder()`) reads the final hidden states. Models whose logits
are more than `lm_head(h)` (soft-capped or scaled logits) are refused rather than silently distilled
on the wrong distribution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import transformers

from .._validation import check_loss_parameters
from ..fused_linear import fused_linear_adaptive_kd

IGNORE_INDEX = -100
LABEL_KEYS = ("labels", "shift_labels")
# Config keys that put something between lm_head and the logits; the fused loss would ignore it.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def check_settings(temperature, ce_weight, alpha_min, alpha_max, clip) -> None:
    check_loss_parameters(alpha_min, alpha_max, clip, temperature)
    if not isinstance(ce_weight, (int, float)) or isinstance(ce_weight, bool) or not ce_weight >= 0:
        raise ValueError(f"ce_weight must be a number >= 0, got {ce_weight!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / accelerate wrappers (`.module`), whose `lm_head` and decoder the loss reads."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def output_projection(model: nn.Module, role: str) -> nn.Linear:
    """`model`'s `lm_head`, checked to be all there is between the final hidden states and the logits."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the {role} ({type(model).__name__}) has no nn.Linear output projection (lm_head); "
                         f"only causal language models can be distilled this way")
    config = getattr(model, "config", None)
    for key in LOGIT_TRANSFORMS:
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"the {role} ({type(model).__name__}) sets {key}={value}: its logits are not lm_head(h), "
                             f"which the fused loss assumes")
    return head


def distilled_positions(inputs: Mapping[str, Any]) -> torch.Tensor:
    """bool `[batch, seq]`: the positions whose next-token distribution is distilled (see the module doc)."""
    if "shift_labels" in inputs:
        targets = inputs["shift_labels"]
    elif "labels" in inputs:
        labels = inputs["labels"]
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    else:
        raise ValueError("the batch has no 'labels' (or 'shift_labels'): mark the tokens to distill with labels and "
                         "the prompt and padding with -100, as for causal-LM fine-tuning")
    positions = targets != IGNORE_INDEX
    attention = inputs.get("attention_mask")
    if isinstance(attention, torch.Tensor) and attention.dim() == 2 and attention.shape == positions.shape:
        positions = positions & attention.bool()
    return positions


def next_token_targets(inputs: Mapping[str, Any]) -> torch.Tensor:
    """long `[batch, seq]`: the token each position predicts (-100 where there is none)."""
    if "shift_labels" in inputs:
        return inputs["shift_labels"]
    return F.pad(inputs["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)


def final_hidden_states(model: nn.Module, inputs: Mapping[str, Any]) -> Tuple[torch.Tensor, Any]:
    """Run `model` (wrapped or not) on `inputs` projecting no logits; its decoder's output and the model's."""
    inner = unwrap(model)
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else getattr(inner, "base_model", None)
    if decoder is None or decoder is inner:
        raise ValueError(f"{type(inner).__name__} has no separate decoder (get_decoder()) whose hidden states "
                         f"the loss could read")
    captured = []
    hook = decoder.register_forward_hook(lambda module, args, output: captured.append(
        output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]))
    model_inputs = {key: value for key, value in inputs.items() if key not in LABEL_KEYS}
    device = inputs["input_ids"].device if "input_ids" in inputs else None
    try:
        outputs = model(**model_inputs, use_cache=False,
                        logits_to_keep=torch.empty(0, dtype=torch.long, device=device))
    finally:
        hook.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one call of {type(decoder).__name__} per forward, saw {len(captured)}")
    return captured[0], outputs


def _chunk_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # 16-bit logits: softmax in float32
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                          chunk_size: int = 1024) -> torch.Tensor:
    """Sum of the hard-label cross-entropy of `head(hidden)`, one checkpointed chunk of rows at a time (the
    backward recomputes a chunk's logits instead of keeping every chunk's)."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        total = total + checkpoint(_chunk_cross_entropy, hidden[rows], head.weight, head.bias, targets[rows],
                                   use_reentrant=False)
    return total


@dataclass
class DistillationLoss:
    """`loss` (what to backpropagate), its two sums (detached, before division by `tokens`), the count it was
    divided by, this batch's distilled positions, and the student's model output (its logits are empty: nothing
    was projected)."""
    loss: torch.Tensor
    kd_sum: torch.Tensor
    ce_sum: Optional[torch.Tensor]
    tokens: torch.Tensor
    distilled: torch.Tensor
    outputs: Any


def causal_lm_adaptive_kd(
    student: nn.Module,
    teacher: nn.Module,
    inputs: Mapping[str, Any],
    *,
    num_items_in_batch: Optional[torch.Tensor | int] = None,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    alpha_min: float = -1.0,
    alpha_max: float = 1.0,
    clip: float = 5.0,
    chunk_size: Optional[int] = None,
) -> DistillationLoss:
    """The adaptive alpha-divergence distillation loss of a causal LM batch (see the module doc).

    Args:
        student: the student causal LM, or the wrapper around it (DDP): its forward is called as given.
        teacher: the frozen teacher causal LM, same vocabulary, on the student's device; run under no_grad.
        inputs: the batch (`input_ids`, `attention_mask`, `labels` with -100 on prompt and padding, ...).
        num_items_in_batch: the number of distilled positions the loss is normalised by (all micro-batches of
            the optimizer step); default: this batch's.
        temperature: KD temperature (default 1.0): logits are divided by it, the KD term multiplied by its square.
        ce_weight: weight of the hard-label cross-entropy added to the KD term (default 0.0: distillation only).
        alpha_min, alpha_max, clip: the adaptive divergence's range and gradient clip (AlphaNet: -1, 1, 5).
        chunk_size: rows per chunk of the fused projection (default: chosen from the sizes).
    """
    check_settings(temperature, ce_weight, alpha_min, alpha_max, clip)
    positions = distilled_positions(inputs)
    student_head = output_projection(unwrap(student), "student")
    teacher_head = output_projection(unwrap(teacher), "teacher")
    with torch.no_grad():
        teacher_hidden, _ = final_hidden_states(teacher, inputs)
    student_hidden, outputs = final_hidden_states(student, inputs)
    kd_sum = fused_linear_adaptive_kd(
        student_hidden, student_head.weight, teacher_hidden, teacher_head.weight,
        student_bias=student_head.bias, teacher_bias=teacher_head.bias, alpha_min=alpha_min, alpha_max=alpha_max,
        clip=clip, temperature=temperature, reduction="sum", mask=positions, chunk_size=chunk_size)
    total, ce_sum = kd_sum, None
    if ce_weight > 0:
        targets = next_token_targets(inputs).masked_fill(~positions, IGNORE_INDEX)
        ce_sum = chunked_cross_entropy(student_hidden, student_head, targets)
        total = total + ce_weight * ce_sum
    distilled = positions.sum()
    if num_items_in_batch is None:
        tokens = distilled
    else:
        tokens = torch.as_tensor(num_items_in_batch, device=positions.device)
    loss = total / tokens.clamp(min=1).to(total.dtype)
    return DistillationLoss(loss, kd_sum.detach(), None if ce_sum is None else ce_sum.detach(), tokens, distilled,
                            outputs)


class AdaptiveKDTrainer(transformers.Trainer):
    """`transformers.Trainer` that distills `teacher_model` into `model` with :func:`causal_lm_adaptive_kd`.

    Everything else is the Trainer's: the student's forward goes through its DDP wrapper, gradient accumulation,
    AMP, logging and checkpoints. The loss of an optimizer step is normalised by the distilled positions of all
    its micro-batches (and, with `average_tokens_across_devices`, all processes). The teacher is frozen, put in
    eval mode and moved to the training device; each process holds a full copy of it.

    The training logs gain `kd_loss` (and `ce_loss` when `ce_weight` > 0): each term per distilled token since the
    last log, over all processes (the KD term includes the T^2 factor), summed on the device and read only when the
    Trainer logs (one all-reduce per log under several processes).

    Args (besides the Trainer's):
        teacher_model: the teacher causal LM (same vocabulary as the student).
        temperature: KD temperature, default 1.0.
        ce_weight: weight of the hard-label cross-entropy added to the KD term, default 0.0 (distillation only).
        alpha_min, alpha_max, clip: the adaptive divergence's settings, default -1.0, 1.0, 5.0 (AlphaNet).
    """

    # The loss is already divided by the tokens of the whole accumulated step (see get_batch_samples).
    loss_is_scaled_for_ga = True

    def __init__(self, *args, teacher_model: nn.Module, temperature: float = 1.0, ce_weight: float = 0.0,
                 alpha_min: float = -1.0, alpha_max: float = 1.0, clip: float = 5.0, **kwargs):
        check_settings(temperature, ce_weight, alpha_min, alpha_max, clip)
        super().__init__(*args, **kwargs)
        output_projection(unwrap(self.model), "student")
        output_projection(teacher_model, "teacher")
        self.teacher_model = teacher_model.to(self.args.device).eval().requires_grad_(False)
        self.loss_settings: Dict[str, float] = dict(temperature=temperature, ce_weight=ce_weight,
                                                    alpha_min=alpha_min, alpha_max=alpha_max, clip=clip)
        self.logged_sums: Dict[str, torch.Tensor] = {}  # kd, ce and tokens since the last training log

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches and their distilled positions, counted by the loss's own rule (summed over
        processes when the Trainer averages tokens across devices)."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches:
            return batches, None
        count = sum(distilled_positions(batch).sum().to(device) for batch in batches)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return batches, count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = causal_lm_adaptive_kd(model, self.teacher_model, inputs, num_items_in_batch=num_items_in_batch,
                                       **self.loss_settings)
        if self.model.training:
            for name, value in (("kd", result.kd_sum), ("ce", result.ce_sum), ("tokens", result.distilled)):
                if value is not None:
                    self.logged_sums[name] = self.logged_sums.get(name, 0) + value.float()
        loss = result.loss
        # DDP averages the processes' gradients; a loss divided by the tokens of all processes is scaled back up.
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        return (loss, result.outputs) if return_outputs else loss

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self.logged_sums:
            # Every process logs the training loss at the same step (the Trainer gathers `loss` there too), so the
            # sums of all processes are reduced here, in one all-reduce.
            sums, self.logged_sums = self.logged_sums, {}
            names = sorted(sums)
            totals = torch.stack([sums[name] for name in names])
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            totals = dict(zip(names, totals.tolist()))
            tokens = max(totals.pop("tokens"), 1.0)
            logs.update({f"{name}_loss": value / tokens for name, value in totals.items()})
        super().log(logs, *args, **kwargs)
