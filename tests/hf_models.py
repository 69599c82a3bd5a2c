"""Tiny random-weight causal LMs and token batches for the transformers integration tests (no download)."""
from __future__ import annotations

import random
from typing import Dict, List

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 2048
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM, False), "qwen": (Qwen2Config, Qwen2ForCausalLM, True)}


def tiny_model(family: str, hidden: int, seed: int, head_scale: float) -> torch.nn.Module:
    """A 2-layer model of `family` (Qwen-style ties the embeddings to lm_head); lm_head scaled so that its
    next-token distributions are far from uniform."""
    config_class, model_class, tied = FAMILIES[family]
    config = config_class(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=tied, pad_token_id=0)
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    return model


def student_and_teacher(family: str, dtype: torch.dtype = torch.float32):
    return (tiny_model(family, 32, seed=1, head_scale=20.0).to(dtype),
            tiny_model(family, 48, seed=2, head_scale=40.0).to(dtype))


def examples(count: int, seed: int = 0) -> List[Dict[str, List[int]]]:
    """Sequences of 6..16 tokens whose first 1..4 tokens are a prompt (label -100): every example has a different
    number of distilled tokens, so a wrong normalisation shows."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        length, prompt = rng.randint(6, 16), rng.randint(1, 4)
        ids = [rng.randrange(1, VOCAB) for _ in range(length)]
        out.append(dict(input_ids=ids, labels=[-100] * prompt + ids[prompt:]))
    return out


def collate(batch: List[Dict[str, List[int]]]) -> Dict[str, torch.Tensor]:
    """Right padding: pad id 0, attention 0, label -100."""
    width = max(len(example["input_ids"]) for example in batch)
    pad = lambda values, fill: values + [fill] * (width - len(values))
    return dict(input_ids=torch.tensor([pad(e["input_ids"], 0) for e in batch]),
                attention_mask=torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in batch]),
                labels=torch.tensor([pad(e["labels"], -100) for e in batch]))


def training_arguments(out_dir: str, per_device: int, accumulation: int, steps: int, **overrides):
    """Plain SGD, constant rate, no clipping: the update is the gradient, so normalisation errors show."""
    from transformers import TrainingArguments

    settings = dict(output_dir=out_dir, per_device_train_batch_size=per_device,
                    gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=0.5, optim="sgd",
                    lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
                    report_to="none", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                    remove_unused_columns=False, dataloader_num_workers=0, logging_steps=1)
    settings.update(overrides)
    return TrainingArguments(**settings)
