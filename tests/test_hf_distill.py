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
    for name, hidden, seed, padding in (("Qwen/Qwen2.5-0.5B", 32, 1, 0), ("Qwen/Qwen2.5-7B", 48, 2, 128)):
        folder = str(tmp_path / name)
        model = tiny_model("qwen", hidden, seed=seed, head_scale=20.0)
        if padding:  # the larger model's embedding padded, as Qwen2.5-7B's 152064 rows against 151936
            model.resize_token_embeddings(model.config.vocab_size + padding)
        model.save_pretrained(folder)
        save_tiny_tokenizer(folder, lines)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "PYTHONPATH": os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "train_loss" in output, output[-3000:]
    assert "'epoch': '1'" in output or "'epoch': 1" in output, output[-3000:]


def test_a_teacher_head_padded_by_64_rows_distills_on_the_shared_rows(gen):
    """Qwen2.5-7B -> 0.5B in small: one tokenizer, the teacher's embedding padded. The padded rows take no part
    in the softmax: loss and gradients equal the float64 computation on the teacher's first V logits."""
    student, teacher = student_and_teacher("qwen", torch.float64)
    teacher.resize_token_embeddings(teacher.config.vocab_size + 64)
    with torch.no_grad():  # padded rows with large logits: any leak into the softmax shows
        teacher.get_output_embeddings().weight[-64:] = 50 * torch.randn(64, 48, generator=gen, dtype=torch.float64)
    twin, inputs = copy.deepcopy(student), batch(seed=7)
    fused = causal_lm_adaptive_kd(student, teacher, inputs, tokenizer=list(range(2048)))
    fused.loss.backward()
    model_inputs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    logits = twin(**model_inputs).logits
    with torch.no_grad():
        teacher_logits = teacher(**model_inputs).logits[..., :2048]
    positions = distilled_positions(inputs)
    reference = ak.adaptive_kd_reference(logits[positions], teacher_logits[positions], reduction="sum") / positions.sum()
    reference.backward()
    torch.testing.assert_close(fused.loss, reference, rtol=1e-10, atol=0)
    for (name, parameter), (_, expected) in zip(student.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(parameter.grad, expected.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_per_token_values_sum_to_the_loss_and_carry_their_own_gradient(gen):
    student, teacher = student_and_teacher("llama", torch.float64)
    twin, inputs = copy.deepcopy(student), batch(seed=8)
    result = causal_lm_adaptive_kd(student, teacher, inputs, per_token=True, ce_weight=0.5, temperature=1.5)
    positions = distilled_positions(inputs)
    assert result.per_token.shape == positions.shape and torch.all(result.per_token[~positions] == 0)
    torch.testing.assert_close(result.per_token.sum() / positions.sum(), result.loss, rtol=1e-12, atol=0)
    summed = causal_lm_adaptive_kd(copy.deepcopy(twin), teacher, inputs, ce_weight=0.5, temperature=1.5)
    torch.testing.assert_close(result.loss, summed.loss, rtol=1e-12, atol=0)
    # Weighted tokens: the gradient of sum(w * per_token) equals the unfused float64 one.
    weights = torch.rand(positions.shape, generator=gen, dtype=torch.float64)
    (weights * result.per_token).sum().backward()
    model_inputs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    logits = twin(**model_inputs).logits
    with torch.no_grad():
        teacher_logits = teacher(**model_inputs).logits
    per_position = ak.adaptive_kd_reference(logits[positions], teacher_logits[positions], temperature=1.5,
                                            reduction="none")
    per_position = per_position + 0.5 * F.cross_entropy(logits[positions], next_token_targets(inputs)[positions],
                                                        reduction="none")
    torch.testing.assert_close(result.per_token[positions].detach(), per_position.detach(), rtol=1e-10, atol=1e-12)
    (weights[positions] * per_position).sum().backward()
    for (name, parameter), (_, expected) in zip(student.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(parameter.grad, expected.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_a_bfloat16_teacher_distills_a_float32_student():
    student, teacher = student_and_teacher("llama")
    inputs = batch(seed=9)
    fused = causal_lm_adaptive_kd(student, teacher.to(torch.bfloat16), inputs)
    model_inputs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    with torch.no_grad():
        teacher_logits = teacher(**model_inputs).logits.double()  # the bf16 teacher's own logits
        logits = student(**model_inputs).logits.double()
    positions = distilled_positions(inputs)
    expected = ak.adaptive_kd_reference(logits[positions], teacher_logits[positions], reduction="sum") / positions.sum()
    assert fused.loss.dtype == torch.float32
    torch.testing.assert_close(fused.loss.double(), expected, rtol=2e-2, atol=0)  # bf16 head: logits rounded


def test_the_trainer_logs_the_diagnostics_of_the_tokens_it_distilled(tmp_path):
    from hf_models import tiny_model

    # The teacher's own weights with a flatter head: most tokens take the alpha_min branch, with clipped weights.
    student, teacher = tiny_model("llama", 32, seed=1, head_scale=10.0), tiny_model("llama", 32, seed=1, head_scale=20.0)
    data = examples(12)
    with torch.no_grad():
        expected = causal_lm_adaptive_kd(student, teacher, collate(data), return_stats=True).stats
    assert 0 < expected.alpha_min_share.item() < 1 and expected.clip_share.item() > 0
    arguments = training_arguments(str(tmp_path / "run"), 12, 1, 1)
    trainer = AdaptiveKDTrainer(model=student, teacher_model=teacher, args=arguments, data_collator=collate,
                                train_dataset=data)
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "kd_loss" in entry)
    assert logged["kd_alpha_min_share"] == pytest.approx(expected.alpha_min_share.item(), rel=1e-6)
    assert logged["kd_clip_share"] == pytest.approx(expected.clip_share.item(), rel=1e-6)
    quiet = AdaptiveKDTrainer(model=student, teacher_model=teacher, data_collator=collate, train_dataset=data,
                              args=training_arguments(str(tmp_path / "quiet"), 12, 1, 1), log_stats=False)
    quiet.train()
    assert not any("kd_clip_share" in entry for entry in quiet.state.log_history)


def test_a_lora_student_trains_its_adapters_and_leaves_lm_head_without_gradient(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    student, teacher = student_and_teacher("llama")
    lora = peft.get_peft_model(student, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = {name: value.detach().clone() for name, value in lora.named_parameters()}
    head = lora.get_output_embeddings()
    trainer = AdaptiveKDTrainer(model=lora, teacher_model=teacher, train_dataset=examples(8), data_collator=collate,
                                args=training_arguments(str(tmp_path / "lora"), 4, 1, 2, optim="adamw_torch",
                                                        learning_rate=1e-2))
    trainer.train()
    # A frozen head gets no [V, H] gradient buffer either (test_fused_linear checks the allocations).
    assert head.weight.grad is None and not head.weight.requires_grad
    changed = {name for name, value in lora.named_parameters() if not torch.equal(value, before[name])}
    assert changed and all("lora_" in name for name in changed), sorted(changed)[:5]
    assert any("kd_loss" in entry for entry in trainer.state.log_history)
