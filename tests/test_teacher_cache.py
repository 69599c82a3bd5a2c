"""The offline teacher: alphadiv-cache-teacher's shards (resumable after SIGKILL), the cache read back by
AdaptiveKDTrainer, the same training as from the live teacher's top-k, and its one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="the [hf] extra is not installed")
pytest.importorskip("safetensors", reason="the [hf] extra is not installed")

import alphadiv_kernels as ak  # noqa: E402
from alphadiv_kernels.integrations.teacher_cache import (TeacherCache, TeacherCacheCollator,  # noqa: E402
                                                         cache_teacher)
from alphadiv_kernels.integrations.transformers import (AdaptiveKDTrainer, causal_lm_adaptive_kd,  # noqa: E402
                                                        causal_lm_sparse_adaptive_kd, distilled_positions,
                                                        final_hidden_states)
from hf_models import collate, examples, student_and_teacher, training_arguments  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def save_teacher_and_data(tmp_path, count=12):
    _, teacher = student_and_teacher("llama")
    teacher.save_pretrained(tmp_path / "teacher")
    data = examples(count, seed=5)
    with open(tmp_path / "data.jsonl", "w") as f:
        for example in data:
            f.write(json.dumps(example) + "\n")
    return teacher, data


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "alphadiv_kernels.integrations.teacher_cache", *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def shard_files(folder):
    return sorted(name for name in os.listdir(folder) if name.startswith("shard-"))


def test_the_cache_holds_the_teacher_top_k_of_every_token(tmp_path):
    _, teacher = student_and_teacher("llama")
    data = examples(7, seed=1)
    manifest = cache_teacher(teacher, data, str(tmp_path / "cache"), k=16, temperature=2.0, dtype="float32",
                             batch_size=3, shard_examples=3, progress=False)
    assert manifest["shards"] == 3 and manifest["tokens"] == sum(len(e["input_ids"]) for e in data)
    cache = TeacherCache(str(tmp_path / "cache"))
    for example in data:
        ids = torch.tensor([example["input_ids"]])
        logits = teacher(input_ids=ids).logits[0].double() / 2.0
        top = torch.log_softmax(logits, -1).topk(16, -1)
        indices, logprobs = cache.lookup(example["input_ids"])
        assert indices.dtype == torch.int32 and logprobs.dtype == torch.float32
        torch.testing.assert_close(logprobs.double(), top.values, rtol=1e-5, atol=1e-5)
        assert (indices == top.indices).float().mean() > 0.99  # ties of near-equal logits may swap


def test_sigkill_mid_run_then_rerun_writes_each_shard_once(tmp_path):
    save_teacher_and_data(tmp_path, count=12)
    common = ["--model", str(tmp_path / "teacher"), "--data", str(tmp_path / "data.jsonl"), "--k", "8",
              "--shard-examples", "2", "--batch-size", "1", "--dtype", "float32"]
    # Killed while the third shard's file is being written: two finished shards and one partial file.
    killer = ("import os, signal, safetensors.torch as st, runpy, sys\n"
              "save, calls = st.save_file, []\n"
              "def dying_save(tensors, path, metadata=None):\n"
              "    calls.append(path)\n"
              "    if len(calls) == 3:\n"
              "        open(path, 'wb').write(b'partial')\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    save(tensors, path, metadata=metadata)\n"
              "st.save_file = dying_save\n"
              "from alphadiv_kernels.integrations import teacher_cache\n"
              "teacher_cache.main(sys.argv[1:])\n")
    killed = subprocess.run([sys.executable, "-c", killer, *common, "--out", str(tmp_path / "cache")],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert shard_files(tmp_path / "cache") == ["shard-00000.safetensors", "shard-00001.safetensors",
                                               "shard-00002.safetensors.tmp"]
    with pytest.raises(ValueError, match="unfinished: 4 of 6 shards are missing"):
        TeacherCache(str(tmp_path / "cache"))
    finished = {name: os.stat(tmp_path / "cache" / name) for name in shard_files(tmp_path / "cache")
                if not name.endswith(".tmp")}
    resumed = run_cli(*common, "--out", str(tmp_path / "cache"))
    assert resumed.returncode == 0, resumed.stderr
    assert shard_files(tmp_path / "cache") == [f"shard-{i:05d}.safetensors" for i in range(6)]  # no .tmp left
    for name, before in finished.items():  # the shards of the killed run were not written again
        after = os.stat(tmp_path / "cache" / name)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    once = run_cli(*common, "--out", str(tmp_path / "uninterrupted"))
    assert once.returncode == 0, once.stderr
    assert "MB per million tokens" in once.stderr
    from safetensors.torch import load_file
    for name in shard_files(tmp_path / "cache"):
        resumed_shard, whole_shard = load_file(tmp_path / "cache" / name), load_file(tmp_path / "uninterrupted" / name)
        for key in whole_shard:
            assert torch.equal(resumed_shard[key], whole_shard[key]), (name, key)


def test_cli_bad_inputs_are_one_line_before_anything_is_written(tmp_path):
    save_teacher_and_data(tmp_path, count=3)
    base = ["--model", str(tmp_path / "teacher"), "--data", str(tmp_path / "data.jsonl")]
    cases = [
        (base + ["--out", str(tmp_path / "a"), "--k", "0"], "--k must be >= 1"),
        (base + ["--out", str(tmp_path / "b"), "--k", "5000"],
         "k must be a whole number in [1, 2048] (the teacher's classes)"),
        (["--model", str(tmp_path / "nowhere"), "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "c")],
         "--model"),
        (["--model", str(tmp_path / "teacher"), "--data", str(tmp_path / "missing.jsonl"), "--out",
          str(tmp_path / "d")], "no such file"),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not os.path.exists(args[args.index("--out") + 1])
    assert run_cli(*base, "--out", str(tmp_path / "cache"), "--k", "4").returncode == 0
    other = run_cli(*base, "--out", str(tmp_path / "cache"), "--k", "8")
    assert other.returncode == 1 and "made with other settings (k: 4 there, 8 now)" in other.stderr
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    taken = run_cli(*base, "--out", str(tmp_path / "notes"), "--k", "4")
    assert taken.returncode == 1 and "is not a teacher cache" in taken.stderr
    assert os.listdir(tmp_path / "notes") == ["mine.txt"]


def test_the_collator_places_cached_rows_under_right_and_left_padding(tmp_path):
    _, teacher = student_and_teacher("llama")
    data = examples(4, seed=2)
    cache_teacher(teacher, data, str(tmp_path / "cache"), k=4, progress=False)
    cache = TeacherCache(str(tmp_path / "cache"))

    def left_padded(batch):
        out = collate(batch)
        lengths = out["attention_mask"].sum(1)
        for row, length in enumerate(lengths.tolist()):
            for key in out:
                out[key][row] = torch.roll(out[key][row], out[key].shape[1] - length)
        return out

    for collator in (collate, left_padded):
        batch = TeacherCacheCollator(cache, collator)(data)
        for row, example in enumerate(data):
            where = batch["attention_mask"][row].nonzero().squeeze(1)
            indices, logprobs = cache.lookup(example["input_ids"])
            assert torch.equal(batch["teacher_topk_indices"][row, where], indices)
            assert torch.equal(batch["teacher_topk_logprobs"][row, where], logprobs)
            padding = batch["attention_mask"][row] == 0
            assert bool((batch["teacher_topk_logprobs"][row, padding] == float("-inf")).all())
    with pytest.raises(ValueError, match="not in the teacher cache"):
        TeacherCacheCollator(cache, collate)(examples(2, seed=99))


def test_sparse_loss_from_the_cache_equals_the_live_top_k_and_the_reference(tmp_path):
    student, teacher = student_and_teacher("qwen", torch.float64)
    data = examples(3, seed=4)
    cache_teacher(teacher, data, str(tmp_path / "cache"), k=32, temperature=1.5, dtype="float32", progress=False)
    cache = TeacherCache(str(tmp_path / "cache"))
    batch = TeacherCacheCollator(cache, collate)(data)
    indices, logprobs = batch.pop("teacher_topk_indices"), batch.pop("teacher_topk_logprobs")
    cached = causal_lm_sparse_adaptive_kd(student, batch, indices, logprobs, teacher_vocab_size=cache.vocab_size,
                                          temperature=1.5)
    live = causal_lm_adaptive_kd(student, teacher, batch, temperature=1.5, teacher_topk=32)
    torch.testing.assert_close(cached.loss.double(), live.loss.double(), rtol=1e-6, atol=1e-8)
    # the reference: the float64 sparse loss on materialised student logits
    positions = distilled_positions(batch)
    hidden, _ = final_hidden_states(student, batch)
    logits = student.get_output_embeddings()(hidden)[positions]
    expected = ak.sparse_adaptive_kd_reference(logits, indices[positions], logprobs[positions].double(),
                                               temperature=1.5, reduction="sum") / positions.sum()
    torch.testing.assert_close(cached.loss.double(), expected, rtol=1e-5, atol=1e-7)


def train(tmp_path, name, **teacher):
    student, _ = student_and_teacher("llama")
    data = examples(16, seed=7)
    trainer = AdaptiveKDTrainer(model=student, args=training_arguments(str(tmp_path / name), 4, 1, 4),
                                train_dataset=data, data_collator=collate, ce_weight=0.5, temperature=2.0, **teacher)
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_training_from_the_cache_and_from_the_live_teacher_top_k_give_one_loss_curve(tmp_path):
    _, teacher = student_and_teacher("llama")
    cache_teacher(teacher, examples(16, seed=7), str(tmp_path / "cache"), k=64, temperature=2.0, dtype="float32",
                  progress=False)
    from_cache = train(tmp_path, "cached", teacher_cache=str(tmp_path / "cache"))
    from_live = train(tmp_path, "live", teacher_model=teacher, teacher_topk=64)
    assert len(from_cache) == len(from_live) == 4
    for cached, live in zip(from_cache, from_live):
        for key in ("loss", "kd_loss", "ce_loss"):
            assert cached[key] == pytest.approx(live[key], rel=1e-5), (key, cached, live)
    assert from_cache[-1]["kd_loss"] < from_cache[0]["kd_loss"]


def test_trainer_refuses_a_cache_of_other_data_another_temperature_or_both_teachers(tmp_path):
    student, teacher = student_and_teacher("llama")
    cache_teacher(teacher, examples(4, seed=8), str(tmp_path / "cache"), k=8, temperature=2.0, progress=False)
    args = training_arguments(str(tmp_path / "out"), 2, 1, 1)
    with pytest.raises(ValueError, match="does not match train_dataset: 4 of 4 examples are not in it"):
        AdaptiveKDTrainer(model=student, args=args, train_dataset=examples(4, seed=9), data_collator=collate,
                          teacher_cache=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="holds log-probabilities at temperature 2.0"):
        AdaptiveKDTrainer(model=student, args=args, train_dataset=examples(4, seed=8), data_collator=collate,
                          teacher_cache=str(tmp_path / "cache"), temperature=1.0)
    with pytest.raises(ValueError, match="one of the two"):
        AdaptiveKDTrainer(model=student, args=args, teacher_model=teacher, teacher_cache=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="not a teacher cache"):
        AdaptiveKDTrainer(model=student, args=args, teacher_cache=str(tmp_path))
