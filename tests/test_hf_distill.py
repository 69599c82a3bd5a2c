"""The transformers integration: AdaptiveKDTrainer and causal_lm_adaptive_kd on tiny random Llama / Qwen models."""
import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="the [hf] extra is not installed")
pytest.importorskip("accelerate", reason="the [hf] extra is not installed")

import alphadiv_kernels as ak  # noqa: E402
from alphadiv_kernels.integrations.transformers import (AdaptiveKDTrainer, causal_lm_adaptive_kd,  # noqa: E402
                                                        distilled_positions, next_token_targets)
from hf_models import collate, examples, student_and_teacher, training_arguments  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def batch(seed: int = 0, count: int = 3):
    return collate(examples(count, seed=seed))


def unfused_loss(student, teacher, inputs, temperature=1.0, ce_weight=0.0):
    """The same objective with materialised logits and the float64 reference loss."""
    model_inputs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    logits = student(**model_inputs).logits
    with torch.no_grad():
        teacher_logits = teacher(**model_inputs).logits
    positions = distilled_positions(inputs)
    total = ak.adaptive_kd_reference(logits[positions], teacher_logits[positions], temperature=temperature,
                                     reduction="sum")
    if ce_weight:
        total = total + ce_weight * F.cross_entropy(logits[positions], next_token_targets(inputs)[positions],
                                                    reduction="sum")
    return total / positions.sum()


@pytest.mark.parametrize("family", ["llama", "qwen"])
@pytest.mark.parametrize("temperature, ce_weight", [(1.0, 0.0), (2.0, 0.5)])
def test_loss_and_gradients_equal_the_unfused_float64_computation(family, temperature, ce_weight):
    student, teacher = student_and_teacher(family, torch.float64)
    twin = copy.deepcopy(student)
    inputs = batch(seed=3)
    fused = causal_lm_adaptive_kd(student, teacher, inputs, temperature=temperature, ce_weight=ce_weight)
    fused.loss.backward()
    reference = unfused_loss(twin, teacher, inputs, temperature, ce_weight)
    reference.backward()
    assert fused.loss.dtype == torch.float64
    torch.testing.assert_close(fused.loss, reference, rtol=1e-10, atol=0)
    assert fused.outputs.logits.numel() == 0  # the student projected no logits itself
    for (name, parameter), (_, expected) in zip(student.named_parameters(), twin.named_parameters()):
        assert expected.grad is not None and expected.grad.abs().sum() > 0, name
        torch.testing.assert_close(parameter.grad, expected.grad, rtol=1e-9, atol=1e-12, msg=name)
    assert all(parameter.grad is None for parameter in teacher.parameters())


def test_masked_positions_get_no_gradient():
    student, teacher = student_and_teacher("llama", torch.float64)
    inputs = batch(seed=4)
    hidden = []

    def keep(module, args, output):
        output.last_hidden_state.retain_grad()
        hidden.append(output.last_hidden_state)
    student.model.register_forward_hook(keep)
    causal_lm_adaptive_kd(student, teacher, inputs).loss.backward()
    positions = distilled_positions(inputs)
    gradient = hidden[0].grad
    assert (~positions).sum() > 0 and positions.sum() > 0
    assert torch.all(gradient[~positions] == 0), "a prompt, padding or last position got a gradient"
    assert torch.all(gradient[positions].abs().sum(-1) > 0)
    # A position is distilled when it is attended and the token it predicts is labelled.
    labels, attention = inputs["labels"], inputs["attention_mask"].bool()
    assert torch.equal(positions[:, :-1], (labels[:, 1:] != -100) & attention[:, :-1])
    assert not positions[:, -1].any()


def test_shift_labels_from_a_padding_free_collator_mean_the_same_positions():
    student, teacher = student_and_teacher("qwen")
    inputs = batch(seed=5)
    shifted = dict(inputs, shift_labels=F.pad(inputs["labels"][:, 1:], (0, 1), value=-100))
    del shifted["labels"]
    assert torch.equal(distilled_positions(shifted), distilled_positions(inputs))
    torch.testing.assert_close(causal_lm_adaptive_kd(student, teacher, shifted).loss,
                               causal_lm_adaptive_kd(student, teacher, inputs).loss)


def test_normalised_by_num_items_in_batch_when_given():
    student, teacher = student_and_teacher("llama", torch.float64)
    inputs = batch(seed=6)
    own = causal_lm_adaptive_kd(student, teacher, inputs)
    given = causal_lm_adaptive_kd(student, teacher, inputs, num_items_in_batch=torch.tensor(100))
    assert int(own.tokens) == int(distilled_positions(inputs).sum())
    torch.testing.assert_close(given.loss * 100, own.loss * own.tokens.double())


def test_bad_settings_and_batches_are_one_clear_error():
    student, teacher = student_and_teacher("llama")
    inputs = batch()
    with pytest.raises(ValueError, match="labels"):
        causal_lm_adaptive_kd(student, teacher, {k: v for k, v in inputs.items() if k != "labels"})
    with pytest.raises(ValueError, match="temperature"):
        causal_lm_adaptive_kd(student, teacher, inputs, temperature=0.0)
    with pytest.raises(ValueError, match="ce_weight"):
        causal_lm_adaptive_kd(student, teacher, inputs, ce_weight=-1.0)
    smaller = student_and_teacher("llama")[1]
    smaller.resize_token_embeddings(smaller.config.vocab_size - 64)
    with pytest.raises(ValueError, match="do not share a vocabulary: the tokenizer has 2048 tokens"):
        causal_lm_adaptive_kd(student, smaller, inputs, tokenizer=list(range(2048)))
    with pytest.raises(ValueError, match="vocab_size=4096 exceeds"):
        causal_lm_adaptive_kd(student, teacher, inputs, vocab_size=4096)
    teacher.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        causal_lm_adaptive_kd(student, teacher, inputs)


def train_once(tmp_path, per_device, accumulation, ce_weight, steps=1):
    student, teacher = student_and_teacher("llama")
    trainer = AdaptiveKDTrainer(model=student, teacher_model=teacher, train_dataset=examples(16), data_collator=collate,
                                ce_weight=ce_weight,
                                args=training_arguments(str(tmp_path / f"{per_device}x{accumulation}"), per_device,
                                                        accumulation, steps))
    trainer.train()
    assert any("ce_loss" in entry for entry in trainer.state.log_history) == (ce_weight > 0)
    return {name: value.detach().clone() for name, value in student.state_dict().items()}


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_accumulation_1x4_and_4x1_make_the_same_update(tmp_path, ce_weight):
    initial = student_and_teacher("llama")[0].state_dict()
    one_batch_of_four = train_once(tmp_path, per_device=4, accumulation=1, ce_weight=ce_weight)
    four_batches_of_one = train_once(tmp_path, per_device=1, accumulation=4, ce_weight=ce_weight)
    moved = max((one_batch_of_four[name] - initial[name]).abs().max().item() for name in initial)
    assert moved > 1e-3
    for name, value in one_batch_of_four.items():
        torch.testing.assert_close(four_batches_of_one[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_two_gloo_processes_equal_one_process(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    environment = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   "OMP_NUM_THREADS": "1"}
    worker = os.path.join(HERE, "hf_ddp_worker.py")
    runs = {"one": [sys.executable, worker, str(tmp_path / "one.pt"), "4", "1", "2"],
            "two": [torchrun, "--standalone", "--nproc_per_node=2", worker, str(tmp_path / "two.pt"), "2", "1", "2"]}
    for name, command in runs.items():
        done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{name}:\n{(done.stdout + done.stderr)[-3000:]}"
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    initial = student_and_teacher("llama")[0].state_dict()
    assert max((one["weights"][name] - initial[name]).abs().max().item() for name in initial) > 1e-3
    for name, value in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    # The logged KD term covers both processes' tokens, as one process's log covers its whole batch.
    assert len(one["kd_loss"]) == len(two["kd_loss"]) == 2
    assert two["kd_loss"] == pytest.approx(one["kd_loss"], rel=1e-5)


def test_a_short_training_run_lowers_the_distillation_loss(tmp_path):
    student, teacher = student_and_teacher("qwen")
    data = examples(64)
    everything = collate(data)  # the loss on the training data (random tokens do not generalise)
    with torch.no_grad():
        before = causal_lm_adaptive_kd(student, teacher, everything).loss.item()
    arguments = training_arguments(str(tmp_path / "run"), 4, 1, 40, optim="adamw_torch", learning_rate=3e-3,
                                   per_device_eval_batch_size=64)
    trainer = AdaptiveKDTrainer(model=student, teacher_model=teacher, args=arguments, data_collator=collate,
                                train_dataset=data)
    history = trainer.train()
    with torch.no_grad():
        after = causal_lm_adaptive_kd(student, teacher, everything).loss.item()
    assert after < 0.7 * before, (before, after, history)
    # With ce_weight 0 the logged loss is the KD term; logging_steps=1 makes the two windows the same step.
    logged = [entry for entry in trainer.state.log_history if "kd_loss" in entry]
    assert len(logged) == 40 and not any("ce_loss" in entry for entry in logged)
    assert all(abs(entry["loss"] - entry["kd_loss"]) <= 1e-3 * entry["kd_loss"] + 1e-6 for entry in logged), logged[:3]
    # Trainer.evaluate reports the same loss (one batch of all 64 examples).
    evaluated = trainer.evaluate(eval_dataset=data)["eval_loss"]
    assert abs(evaluated - after) < 1e-4 * after, (evaluated, after)


def readme_example() -> str:
    with open(os.path.join(os.path.dirname(HERE), "README.md")) as handle:
        text = handle.read()
    section = text.split("## Distilling a language model", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def save_tiny_tokenizer(folder: str, lines) -> None:
    """A byte-level BPE trained on `lines` (what a Qwen tokenizer folder holds, a few hundred tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(folder)


def test_the_readme_example_runs_as_written(tmp_path):
    """The README's code, unchanged, with tiny Qwen-style models saved where its model names point (a local
    folder of that name is what from_pretrained reads first) and the hub switched off."""
    import random

    from hf_models import tiny_model

    rng = random.Random(0)
    words = [f"w{index}" for index in range(300)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(40)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n\n")
    for name, hidden, seed in (("Qwen/Qwen2.5-0.5B", 32, 1), ("Qwen/Qwen2.5-1.5B", 48, 2)):
        folder = str(tmp_path / name)
        tiny_model("qwen", hidden, seed=seed, head_scale=20.0).save_pretrained(folder)
        save_tiny_tokenizer(folder, lines)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "PYTHONPATH": os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "train_loss" in output, output[-3000:]
    assert "'epoch': '1'" in output or "'epoch': 1" in output, output[-3000:]
