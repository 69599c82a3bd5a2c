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

Heads of different row counts (a padded embedding: Qwen2.5-7B's 152064 rows against Qwen2.5-0.5B's
151936) are compared on their shared rows (`alphadiv_kernels.vocabulary`); given the tokenizer, a pair
whose shared rows do not cover it is refused.

Sharded models (FSDP2, ZeRO-3): the loss runs as the student's `lm_head` forward, so the engine gathers
and reduce-scatters the head as for any layer; the teacher's head is gathered for the loss (`sharding.py`).
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
from ..diagnostics import KDStats
from ..fused_linear import fused_linear_adaptive_kd, fused_linear_sparse_adaptive_kd
from ..sparse import teacher_topk as teacher_topk_of
from ..vocabulary import shared_vocabulary
from .sharding import as_one_forward, frozen_head, full_rows, with_trainable_head
from .teacher_cache import TeacherCache, TeacherCacheCollator

IGNORE_INDEX = -100
LABEL_KEYS = ("labels", "shift_labels")
# Config keys that put something between lm_head and the logits; the fused loss would ignore it.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def check_settings(temperature, ce_weight, alpha_min, alpha_max, clip, vocab_size=None) -> None:
    check_loss_parameters(alpha_min, alpha_max, clip, temperature)
    if not isinstance(ce_weight, (int, float)) or isinstance(ce_weight, bool) or not ce_weight >= 0:
        raise ValueError(f"ce_weight must be a number >= 0, got {ce_weight!r}")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
        raise ValueError(f"vocab_size must be a whole number >= 1, got {vocab_size!r}")


def tokenizer_size(tokenizer) -> Optional[int]:
    """`len(tokenizer)` (every token, added ones included) of a tokenizer or a processor holding one."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    return len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None


def check_vocabularies(student: nn.Module, teacher: nn.Module, vocab_size: Optional[int], tokenizer=None) -> int:
    """The rows the two heads share (one clear error when they cannot be aligned)."""
    return shared_vocabulary(full_rows(output_projection(unwrap(student), "student").weight),
                             full_rows(output_projection(unwrap(teacher), "teacher").weight), vocab_size,
                             tokenizer_size(tokenizer))


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


def final_hidden_states(model: nn.Module, inputs: Mapping[str, Any], forward: Optional[Any] = None
                        ) -> Tuple[torch.Tensor, Any]:
    """Run `model` (wrapped or not; through `forward` when given) on `inputs` projecting no logits; its decoder's
    output and the model's."""
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
        outputs = (forward or model)(**model_inputs, use_cache=False,
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
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                          chunk_size: int = 1024) -> torch.Tensor:
    """Hard-label cross-entropy of `head(hidden)` per position (0 where the target is -100), one checkpointed
    chunk of rows at a time (the backward recomputes a chunk's logits instead of keeping every chunk's)."""
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    pieces = [checkpoint(_chunk_cross_entropy, flat_hidden[rows], head.weight, head.bias, flat_targets[rows],
                         use_reentrant=False)
              for rows in (slice(start, start + chunk_size) for start in range(0, flat_hidden.shape[0], chunk_size))]
    return torch.cat(pieces).reshape(targets.shape)


@dataclass
class DistillationLoss:
    """`loss` (what to backpropagate), its two sums (detached, before division by `tokens`), the count it was
    divided by, this batch's distilled positions, the student's model output (its logits are empty: nothing
    was projected), the loss's diagnostics (`KDStats`, when asked for) and, with `per_token`, the `[batch, seq]`
    values whose sum over the batch divided by `tokens` is `loss` (0 at positions not distilled)."""
    loss: torch.Tensor
    kd_sum: torch.Tensor
    ce_sum: Optional[torch.Tensor]
    tokens: torch.Tensor
    distilled: torch.Tensor
    outputs: Any
    stats: Optional[KDStats] = None
    per_token: Optional[torch.Tensor] = None


def _to_device(inputs: Mapping[str, Any], device: torch.device) -> Dict[str, Any]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}


def _device_of(model: nn.Module) -> Optional[torch.device]:
    parameter = next(unwrap(model).parameters(), None)
    return None if parameter is None else parameter.device


def _distill(student: nn.Module, inputs: Mapping[str, Any], positions: torch.Tensor, kd_through_head, *,
             num_items_in_batch, ce_weight: float, per_token: bool) -> DistillationLoss:
    """The student's forward and loss, given `kd_through_head(hidden, head)` -> (kd values, stats): the KD term
    through the student's head (run as the head's forward, see sharding.py), the CE term, the normalisation."""
    targets = next_token_targets(inputs).masked_fill(~positions, IGNORE_INDEX) if ce_weight > 0 else None

    def project(head: nn.Linear, hidden: torch.Tensor):
        kd, stats = kd_through_head(hidden, head)
        ce = None if targets is None else chunked_cross_entropy(hidden, head, targets)
        return kd, ce, stats

    def student_forward_and_loss(forward):
        student_hidden, outputs = final_hidden_states(student, inputs, forward)
        head = output_projection(unwrap(student), "student")
        return (*with_trainable_head(unwrap(student), head, project, student_hidden), outputs)

    kd, ce, stats, outputs = as_one_forward(student, student_forward_and_loss)
    values = kd if ce is None else kd + ce_weight * (ce if per_token else ce.sum())
    total = values.sum() if per_token else values
    distilled = positions.sum()
    if num_items_in_batch is None:
        tokens = distilled
    else:
        tokens = torch.as_tensor(num_items_in_batch, device=positions.device)
    loss = total / tokens.clamp(min=1).to(total.dtype)
    return DistillationLoss(loss, kd.detach().sum(), None if ce is None else ce.detach().sum(), tokens, distilled,
                            outputs, stats, values if per_token else None)


def _sparse_kd_through_head(indices, logprobs, positions, vocab, per_token, settings):
    def kd_through_head(hidden: torch.Tensor, head: nn.Linear):
        kd = fused_linear_sparse_adaptive_kd(
            hidden, head.weight, indices.to(hidden.device), logprobs.to(hidden.device), student_bias=head.bias,
            reduction="none" if per_token else "sum", mask=positions, vocab_size=vocab, **settings)
        return kd, None
    return kd_through_head


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
    vocab_size: Optional[int] = None,
    tokenizer: Any = None,
    per_token: bool = False,
    return_stats: bool = False,
    teacher_topk: Optional[int] = None,
) -> DistillationLoss:
    """The adaptive alpha-divergence distillation loss of a causal LM batch (see the module doc).

    Args:
        student: the student causal LM, or the wrapper around it (DDP, FSDP2, a PEFT model): its forward is
            called as given.
        teacher: the frozen teacher causal LM, same tokenizer, run under no_grad; it may sit on another device or
            in another dtype (the batch is copied to it, each chunk of its logits back to the student's device).
        inputs: the batch (`input_ids`, `attention_mask`, `labels` with -100 on prompt and padding, ...).
        num_items_in_batch: the number of distilled positions the loss is normalised by (all micro-batches of
            the optimizer step); default: this batch's.
        temperature: KD temperature (default 1.0): logits are divided by it, the KD term multiplied by its square.
        ce_weight: weight of the hard-label cross-entropy added to the KD term (default 0.0: distillation only).
        alpha_min, alpha_max, clip: the adaptive divergence's range and gradient clip (AlphaNet: -1, 1, 5).
        chunk_size: rows per chunk of the fused projection (default: chosen from the sizes).
        vocab_size: rows of the two heads compared (default: the smaller head's; see `alphadiv_kernels.vocabulary`).
        tokenizer: when given, the pair is refused unless the shared rows cover ``len(tokenizer)``.
        per_token: also return the ``[batch, seq]`` values (KD + ce_weight * CE per position, unnormalised).
        return_stats: also return the loss's diagnostics (`KDStats`: alpha_min branch and clip shares; dense
            teacher only).
        teacher_topk: distill from the teacher's top-k log-probabilities (``sparse.teacher_topk``, its logits one
            chunk at a time) instead of its full distribution: what a cache made by ``alphadiv-cache-teacher``
            holds, computed live.
    """
    check_settings(temperature, ce_weight, alpha_min, alpha_max, clip, vocab_size)
    positions = distilled_positions(inputs)
    vocab = check_vocabularies(student, teacher, vocab_size, tokenizer)
    teacher_device = _device_of(teacher)
    teacher_inputs = inputs if teacher_device in (None, positions.device) else _to_device(inputs, teacher_device)
    with torch.no_grad():
        teacher_hidden, _ = final_hidden_states(teacher, teacher_inputs)
    teacher_head = output_projection(unwrap(teacher), "teacher")
    settings = dict(alpha_min=alpha_min, alpha_max=alpha_max, clip=clip, temperature=temperature, chunk_size=chunk_size)
    if teacher_topk is not None:
        with frozen_head(unwrap(teacher), teacher_head, keep=False) as frozen:
            indices, logprobs = teacher_topk_of(teacher_hidden, frozen[0], frozen[1], k=teacher_topk,
                                                temperature=temperature, vocab_size=vocab)
        kd_through_head = _sparse_kd_through_head(indices, logprobs, positions, vocab, per_token, settings)
    else:
        def kd_through_head(hidden: torch.Tensor, head: nn.Linear):
            """KD through the student's head, whole here; the teacher's gathered around it."""
            with frozen_head(unwrap(teacher), teacher_head, keep=per_token) as frozen:
                kd = fused_linear_adaptive_kd(
                    hidden, head.weight, teacher_hidden, frozen[0], student_bias=head.bias, teacher_bias=frozen[1],
                    reduction="none" if per_token else "sum", mask=positions, vocab_size=vocab,
                    return_stats=return_stats, **settings)
            return kd if return_stats else (kd, None)
    return _distill(student, inputs, positions, kd_through_head, num_items_in_batch=num_items_in_batch,
                    ce_weight=ce_weight, per_token=per_token)


def causal_lm_sparse_adaptive_kd(
    student: nn.Module,
    inputs: Mapping[str, Any],
    topk_indices: torch.Tensor,
    topk_logprobs: torch.Tensor,
    *,
    teacher_vocab_size: int,
    num_items_in_batch: Optional[torch.Tensor | int] = None,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    alpha_min: float = -1.0,
    alpha_max: float = 1.0,
    clip: float = 5.0,
    chunk_size: Optional[int] = None,
    vocab_size: Optional[int] = None,
    tokenizer: Any = None,
    per_token: bool = False,
) -> DistillationLoss:
    """:func:`causal_lm_adaptive_kd` against a teacher given as ``[batch, seq, k]`` top-k indices and
    log-probabilities (a cache; `teacher_vocab_size` the rows its softmax covered), no teacher model. The
    log-probabilities are used as given (at the temperature they were made with); `temperature` divides the
    student's logits and multiplies the KD term by its square."""
    check_settings(temperature, ce_weight, alpha_min, alpha_max, clip, vocab_size)
    positions = distilled_positions(inputs)
    if topk_indices.shape[:2] != positions.shape:
        raise ValueError(f"the teacher's top-k rows {list(topk_indices.shape[:2])} do not match the batch's tokens "
                         f"{list(positions.shape)}")
    student_rows = full_rows(output_projection(unwrap(student), "student").weight)
    vocab = shared_vocabulary(student_rows, teacher_vocab_size, vocab_size, tokenizer_size(tokenizer))
    settings = dict(alpha_min=alpha_min, alpha_max=alpha_max, clip=clip, temperature=temperature, chunk_size=chunk_size)
    kd_through_head = _sparse_kd_through_head(topk_indices, topk_logprobs, positions, vocab, per_token, settings)
    return _distill(student, inputs, positions, kd_through_head, num_items_in_batch=num_items_in_batch,
                    ce_weight=ce_weight, per_token=per_token)


class AdaptiveKDTrainer(transformers.Trainer):
    """`transformers.Trainer` that distills `teacher_model` into `model` with :func:`causal_lm_adaptive_kd`.

    Everything else is the Trainer's: the student's forward goes through its DDP / FSDP wrapper, gradient
    accumulation, AMP, logging and checkpoints. The loss of an optimizer step is normalised by the distilled
    positions of all its micro-batches (and, with `average_tokens_across_devices`, all processes). The teacher is
    frozen, put in eval mode and moved to `teacher_device` (default: the training device); each process holds a
    full copy of it unless it was sharded (`fully_shard`) before it was passed.

    The training logs gain `kd_loss` (and `ce_loss` when `ce_weight` > 0): each term per distilled token since the
    last log, over all processes (the KD term includes the T^2 factor), and the loss's diagnostics over the same
    tokens (`alphadiv_kernels.diagnostics`): `kd_alpha_min_share`, the share of distilled tokens whose divergence
    took the alpha_min branch, and `kd_clip_share`, the share of (token, class) weights the clip bounded. All are
    summed on the device and read only when the Trainer logs (one all-reduce per log under several processes).

    A teacher may also be a cache of its top-k log-probabilities (`teacher_cache`, made by
    `alphadiv-cache-teacher`; no teacher model is loaded): the data collator is wrapped to attach each example's
    cached rows (`TeacherCacheCollator`), and the loss is `causal_lm_sparse_adaptive_kd`, with the same masks,
    normalisation and `kd_loss` / `ce_loss` logs (the diagnostics are logged for a dense teacher only). A live
    teacher can be distilled from its top-k the same way (`teacher_topk`): equal to training from its cache
    (float32 log-probabilities) step for step.

    Args (besides the Trainer's):
        teacher_model: the teacher causal LM (same tokenizer as the student; heads may differ in padded rows).
        teacher_cache: instead of `teacher_model`, a teacher cache folder (or a `TeacherCache`); refused at
            construction unless every `train_dataset` example is in it and the tokenizers agree.
        teacher_topk: with `teacher_model`, distill from its top-k log-probabilities per token.
        temperature: KD temperature, default 1.0 (with a cache: the cache's; another value is refused).
        ce_weight: weight of the hard-label cross-entropy added to the KD term, default 0.0 (distillation only).
        alpha_min, alpha_max, clip: the adaptive divergence's settings, default -1.0, 1.0, 5.0 (AlphaNet).
        vocab_size: rows of the two heads compared (default: the smaller head's); with a `processing_class`
            the pair is refused at construction unless they cover ``len(tokenizer)``.
        teacher_device: where the teacher runs (default: the training device).
        log_stats: log the diagnostics (default True; they cost about one more forward of the loss).
    """

    # The loss is already divided by the tokens of the whole accumulated step (see get_batch_samples).
    loss_is_scaled_for_ga = True

    def __init__(self, *args, teacher_model: Optional[nn.Module] = None, teacher_cache: Any = None,
                 teacher_topk: Optional[int] = None, temperature: Optional[float] = None, ce_weight: float = 0.0,
                 alpha_min: float = -1.0, alpha_max: float = 1.0, clip: float = 5.0, vocab_size: Optional[int] = None,
                 teacher_device: Optional[torch.device | str] = None, log_stats: bool = True, **kwargs):
        if (teacher_model is None) == (teacher_cache is None):
            raise ValueError("give AdaptiveKDTrainer a teacher_model or a teacher_cache (one of the two)")
        if teacher_cache is not None and teacher_topk is not None:
            raise ValueError("teacher_topk is for a live teacher_model; a teacher_cache already holds its top-k")
        if teacher_topk is not None and (isinstance(teacher_topk, bool) or not isinstance(teacher_topk, int)
                                         or teacher_topk < 1):
            raise ValueError(f"teacher_topk must be a whole number >= 1, got {teacher_topk!r}")
        cache = None
        if teacher_cache is not None:
            cache = teacher_cache if isinstance(teacher_cache, TeacherCache) else TeacherCache(str(teacher_cache))
            if temperature is not None and float(temperature) != cache.temperature:
                raise ValueError(f"temperature={temperature} but the teacher cache holds log-probabilities at "
                                 f"temperature {cache.temperature}; leave temperature unset or rebuild the cache")
            temperature = cache.temperature
        temperature = 1.0 if temperature is None else temperature
        check_settings(temperature, ce_weight, alpha_min, alpha_max, clip, vocab_size)
        super().__init__(*args, **kwargs)
        self.teacher_cache, self.teacher_model = cache, None
        if cache is not None:
            shared_vocabulary(full_rows(output_projection(unwrap(self.model), "student").weight), cache.vocab_size,
                              vocab_size, tokenizer_size(self.processing_class))
            if self.train_dataset is not None:
                cache.check_dataset(self.train_dataset, self.processing_class)
            self.data_collator = TeacherCacheCollator(cache, self.data_collator)
        else:
            check_vocabularies(self.model, teacher_model, vocab_size, self.processing_class)
            self.teacher_model = teacher_model.to(teacher_device or self.args.device).eval().requires_grad_(False)
        self.loss_settings: Dict[str, Any] = dict(temperature=temperature, ce_weight=ce_weight, alpha_min=alpha_min,
                                                  alpha_max=alpha_max, clip=clip, vocab_size=vocab_size,
                                                  tokenizer=self.processing_class)
        self.teacher_topk = teacher_topk
        self.log_stats = log_stats
        self.logged_sums: Dict[str, torch.Tensor] = {}  # kd, ce, tokens and the diagnostics since the last log

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
        training = self.model.training
        if self.teacher_cache is not None:
            inputs = dict(inputs)
            indices, logprobs = inputs.pop("teacher_topk_indices"), inputs.pop("teacher_topk_logprobs")
            result = causal_lm_sparse_adaptive_kd(model, inputs, indices, logprobs, num_items_in_batch=num_items_in_batch,
                                                  teacher_vocab_size=self.teacher_cache.vocab_size, **self.loss_settings)
        else:
            result = causal_lm_adaptive_kd(model, self.teacher_model, inputs, num_items_in_batch=num_items_in_batch,
                                           return_stats=training and self.log_stats and self.teacher_topk is None,
                                           teacher_topk=self.teacher_topk, **self.loss_settings)
        if training:
            sums = dict(kd=result.kd_sum, ce=result.ce_sum, tokens=result.distilled)
            if result.stats is not None:
                sums.update(alpha_min_rows=result.stats.alpha_min_rows, stat_rows=result.stats.rows,
                            clipped=result.stats.clipped, entries=result.stats.entries)
            for name, value in sums.items():
                if value is not None:
                    self.logged_sums[name] = self.logged_sums.get(name, 0) + value.double()
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
            if "stat_rows" in totals:
                logs["kd_alpha_min_share"] = totals.pop("alpha_min_rows") / max(totals.pop("stat_rows"), 1.0)
                logs["kd_clip_share"] = totals.pop("clipped") / max(totals.pop("entries"), 1.0)
            tokens = max(totals.pop("tokens"), 1.0)
            logs.update({f"{name}_loss": value / tokens for name, value in totals.items()})
        super().log(logs, *args, **kwargs)
