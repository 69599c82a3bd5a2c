"""An offline teacher: its top-k log-probabilities over a dataset, computed once, stored, reused by every student run.

`cache_teacher(model, examples, out_dir, k=...)` (and the console script `alphadiv-cache-teacher`) runs a causal
LM over tokenized examples and writes, per token, its k most likely next tokens (int32) and their
log-probabilities at `temperature` (float16 or float32), computed by `alphadiv_kernels.sparse.teacher_topk`:
the same numbers `AdaptiveKDTrainer(teacher_topk=k)` computes live. Layout of `out_dir`:

    manifest.json           format, model, k, temperature, dtype, vocab_size (rows of the teacher's softmax),
                            tokenizer hash, dataset fingerprint, examples, tokens, shard layout; written first
    shard-00000.safetensors indices [tokens, k], logprobs [tokens, k], lengths [examples] (int32) and
    shard-00001.safetensors keys [examples, 16] (uint8): a BLAKE2 digest of each example's token ids
    ...

Shard i holds examples [i * shard_examples, (i + 1) * shard_examples) in dataset order, each with one row per
token (the distribution of the next token). A shard is written to a `.tmp` file and renamed when complete, so
a run killed at any moment leaves finished shards and no partial one; rerunning the same command (same
settings, same data) writes only the missing shards. Different settings on an existing cache are refused.

Training (`TeacherCache`, `TeacherCacheCollator`) looks examples up by the digest of their token ids, so
shuffling, batching and padding (right or left) do not matter; an example that is not in the cache, a cache of
other data or another tokenizer, and an unfinished cache are one-line errors. Disk: k x (4 + 2) bytes per
token in float16 (k = 64: 384 MB per million tokens).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

FORMAT = "alphadiv-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
LOGPROB_DTYPES = {"float16": torch.float16, "float32": torch.float32}
DEFAULT_SHARD_TOKENS = 1 << 20  # tokens per shard, unless shard_examples is given
KEY_BYTES = 16
# What a rerun must share with the cache it resumes.
SETTINGS = ("format", "version", "model", "k", "temperature", "dtype", "vocab_size", "tokenizer_hash",
            "dataset_fingerprint", "examples", "shard_examples")


def example_key(input_ids) -> bytes:
    """The digest an example is stored and found by: BLAKE2b-128 of its token ids as int64."""
    ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    return hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=KEY_BYTES).digest()


def dataset_fingerprint(keys: Iterable[bytes]) -> str:
    """SHA-256 of the examples' digests in order."""
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key)
    return digest.hexdigest()


def tokenizer_hash(tokenizer) -> Optional[str]:
    """SHA-256 of a tokenizer's vocabulary (token -> id, added tokens included); None without a tokenizer."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return None
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def _token_ids(example: Mapping[str, Any], index: int) -> List[int]:
    ids = example.get("input_ids") if isinstance(example, Mapping) else None
    if ids is None:
        raise ValueError(f"example {index} has no 'input_ids' (tokenize the data first, or give text and a tokenizer)")
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if not ids or not all(isinstance(token, (int, np.integer)) and token >= 0 for token in ids):
        raise ValueError(f"example {index}'s input_ids must be a non-empty list of token ids >= 0")
    return [int(token) for token in ids]


def _shard_path(out_dir: str, shard: int) -> str:
    return os.path.join(out_dir, f"shard-{shard:05d}.safetensors")


def _write_json_atomically(path: str, payload: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_resumable(out_dir: str, manifest: Dict[str, Any]) -> None:
    """An existing folder must be this run's cache (resumed), or empty."""
    path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
        for key in SETTINGS:
            if existing.get(key) != manifest[key]:
                raise ValueError(f"{out_dir} holds a teacher cache made with other settings ({key}: "
                                 f"{existing.get(key)!r} there, {manifest[key]!r} now); choose another folder")
    elif os.path.isdir(out_dir) and any(not name.endswith(".tmp") for name in os.listdir(out_dir)):
        raise ValueError(f"{out_dir} exists and is not a teacher cache; choose an empty or new folder")


def _hidden_states_of(model, batch_ids: List[List[int]], device) -> Tuple[torch.Tensor, List[int]]:
    from .transformers import final_hidden_states
    lengths = [len(ids) for ids in batch_ids]
    width = max(lengths)
    input_ids = torch.zeros(len(batch_ids), width, dtype=torch.long)
    attention = torch.zeros(len(batch_ids), width, dtype=torch.long)
    for row, ids in enumerate(batch_ids):  # right padding: causal attention never sees it
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
    hidden, _ = final_hidden_states(model, {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)})
    return hidden, lengths


@torch.no_grad()
def cache_teacher(model, examples: Sequence[Mapping[str, Any]], out_dir: str, *, k: int, temperature: float = 1.0,
                  dtype: str = "float16", batch_size: int = 8, shard_examples: Optional[int] = None,
                  vocab_size: Optional[int] = None, tokenizer=None, model_name: Optional[str] = None,
                  progress: bool = True) -> Dict[str, Any]:
    """Writes (or finishes) the teacher cache of `examples` (dicts with `input_ids`) in `out_dir`; returns its
    manifest. `vocab_size`: rows of the teacher's head its softmax covers (default ``len(tokenizer)`` when
    given, else the head's rows: a padded head's extra rows never stand for a token)."""
    from ..sparse import teacher_topk
    from .transformers import output_projection, tokenizer_size, unwrap
    from .sharding import full_rows
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if dtype not in LOGPROB_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(LOGPROB_DTYPES)}, got {dtype!r}")
    for name, value in (("batch_size", batch_size), ("shard_examples", shard_examples)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    head = output_projection(unwrap(model), "teacher")
    rows = full_rows(head.weight)
    vocab = vocab_size or min(rows, tokenizer_size(tokenizer) or rows)
    if vocab > rows:
        raise ValueError(f"vocab_size={vocab} exceeds the teacher's {rows} output rows")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be a whole number in [1, {vocab}], got {k!r}")
    token_ids = [_token_ids(example, index) for index, example in enumerate(examples)]
    if not token_ids:
        raise ValueError("no examples to cache")
    keys = [example_key(ids) for ids in token_ids]
    lengths = [len(ids) for ids in token_ids]
    if shard_examples is None:
        shard_examples = max(1, DEFAULT_SHARD_TOKENS // max(1, round(sum(lengths) / len(lengths))))
    shards = (len(token_ids) + shard_examples - 1) // shard_examples
    manifest = dict(format=FORMAT, version=VERSION, model=model_name or getattr(unwrap(model).config, "_name_or_path",
                                                                                type(unwrap(model)).__name__),
                    k=k, temperature=float(temperature), dtype=dtype, vocab_size=vocab,
                    tokenizer_hash=tokenizer_hash(tokenizer), dataset_fingerprint=dataset_fingerprint(keys),
                    examples=len(token_ids), tokens=sum(lengths), shard_examples=shard_examples, shards=shards,
                    shard_tokens=[sum(lengths[i * shard_examples:(i + 1) * shard_examples]) for i in range(shards)])
    _check_resumable(out_dir, manifest)
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # a killed run's unfinished files
        if name.endswith(".tmp"):
            os.remove(os.path.join(out_dir, name))
    _write_json_atomically(os.path.join(out_dir, MANIFEST), manifest)

    model = model.eval()
    device = head.weight.device
    todo = [shard for shard in range(shards) if not os.path.exists(_shard_path(out_dir, shard))]
    bar = tqdm(total=sum(manifest["shard_tokens"][shard] for shard in todo), unit="tok", disable=not progress,
               desc="teacher top-k")
    for shard in todo:
        first, last = shard * shard_examples, min(len(token_ids), (shard + 1) * shard_examples)
        indices, logprobs = [], []
        for start in range(first, last, batch_size):
            hidden, batch_lengths = _hidden_states_of(model, token_ids[start:min(last, start + batch_size)], device)
            top_i, top_lp = teacher_topk(hidden, head.weight, head.bias, k=k, temperature=temperature,
                                         vocab_size=vocab, logprob_dtype=LOGPROB_DTYPES[dtype])
            for row, length in enumerate(batch_lengths):
                indices.append(top_i[row, :length].cpu())
                logprobs.append(top_lp[row, :length].cpu())
            bar.update(sum(batch_lengths))
        tensors = {"indices": torch.cat(indices).contiguous(), "logprobs": torch.cat(logprobs).contiguous(),
                   "lengths": torch.tensor(lengths[first:last], dtype=torch.int32),
                   "keys": torch.tensor(np.frombuffer(b"".join(keys[first:last]), dtype=np.uint8).reshape(-1, KEY_BYTES))}
        path = _shard_path(out_dir, shard)
        save_file(tensors, path + ".tmp", metadata={"first_example": str(first)})
        os.replace(path + ".tmp", path)
    bar.close()
    return manifest


class TeacherCache:
    """A finished teacher cache, read lazily (memory-mapped shards); `lookup(input_ids)` gives an example's rows."""

    def __init__(self, path: str) -> None:
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise ValueError(f"{path} is not a teacher cache (no {MANIFEST}); make one with alphadiv-cache-teacher")
        with open(manifest_path) as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ValueError(f"{path}: not a version-{VERSION} teacher cache")
        missing = [shard for shard in range(self.manifest["shards"]) if not os.path.exists(_shard_path(path, shard))]
        if missing:
            raise ValueError(f"{path} is unfinished: {len(missing)} of {self.manifest['shards']} shards are missing; "
                             f"rerun alphadiv-cache-teacher with the same settings to finish it")
        from safetensors import safe_open
        self.path, self.k, self.vocab_size = path, self.manifest["k"], self.manifest["vocab_size"]
        self.temperature, self.dtype = self.manifest["temperature"], LOGPROB_DTYPES[self.manifest["dtype"]]
        self._files = [safe_open(_shard_path(path, shard), framework="pt") for shard in range(self.manifest["shards"])]
        self.index: Dict[bytes, Tuple[int, int, int]] = {}  # key -> (shard, first row, rows)
        for shard, file in enumerate(self._files):
            offsets = np.concatenate([[0], np.cumsum(file.get_tensor("lengths").numpy())])
            for example, key in enumerate(file.get_tensor("keys").numpy()):
                self.index[key.tobytes()] = (shard, int(offsets[example]), int(offsets[example + 1] - offsets[example]))

    def lookup(self, input_ids) -> Tuple[torch.Tensor, torch.Tensor]:
        """int32 indices and log-probabilities ``[len(input_ids), k]`` of one example."""
        found = self.index.get(example_key(input_ids))
        if found is None:
            raise ValueError(f"an example of {len(input_ids)} tokens is not in the teacher cache {self.path}: cache "
                             f"every dataset the trainer reads (train and eval) with the same tokenization")
        shard, first, rows = found
        file = self._files[shard]
        return file.get_slice("indices")[first:first + rows], file.get_slice("logprobs")[first:first + rows]

    def check_dataset(self, dataset: Iterable[Mapping[str, Any]], tokenizer=None, name: str = "train_dataset") -> None:
        """One clear error unless every example of `dataset` is cached and the tokenizers agree."""
        cached, theirs = self.manifest.get("tokenizer_hash"), tokenizer_hash(tokenizer)
        if cached and theirs and cached != theirs:
            raise ValueError(f"the teacher cache {self.path} was made with another tokenizer than the trainer's")
        keys = [example_key(_token_ids(example, index)) for index, example in enumerate(dataset)]
        if dataset_fingerprint(keys) == self.manifest["dataset_fingerprint"]:
            return
        absent = sum(key not in self.index for key in keys)
        if absent:
            raise ValueError(f"the teacher cache {self.path} does not match {name}: {absent} of {len(keys)} examples "
                             f"are not in it (made from other data or another tokenization); rebuild it")


class TeacherCacheCollator:
    """Wraps a collator: the batch gains `teacher_topk_indices` and `teacher_topk_logprobs` ``[batch, seq, k]``,
    each example's cached rows at the positions of its tokens (read from `attention_mask`, so right and left
    padding both work); padding gets rows without a teacher (log-probabilities -inf)."""

    def __init__(self, cache: TeacherCache, collator) -> None:
        self.cache, self.collator = cache, collator

    def __call__(self, examples: List[Mapping[str, Any]]) -> Dict[str, Any]:
        batch = self.collator(examples)
        input_ids = batch["input_ids"]
        attention = batch.get("attention_mask")
        if attention is None:
            attention = torch.ones_like(input_ids)
        size, width, k = *input_ids.shape, self.cache.k
        indices = torch.arange(k, dtype=torch.int32).expand(size, width, k).clone()  # distinct: valid for the op
        logprobs = torch.full((size, width, k), float("-inf"), dtype=self.cache.dtype)
        for row, example in enumerate(examples):
            tokens = _token_ids(example, row)
            where = attention[row].nonzero().squeeze(1)
            if where.numel() != len(tokens) or not torch.equal(input_ids[row, where].cpu(), torch.tensor(tokens)):
                raise ValueError("the data collator changed an example's tokens (packing, truncation or masking): the "
                                 "teacher cache needs one example per row, padded only")
            indices[row, where], logprobs[row, where] = self.cache.lookup(tokens)
        batch["teacher_topk_indices"], batch["teacher_topk_logprobs"] = indices, logprobs
        return batch


# ---------------------------------------------------------------------------------------------
# The console script


def _read_examples(path: str, tokenizer) -> List[Dict[str, Any]]:
    if not os.path.isfile(path):
        raise ValueError(f"--data {path}: no such file")
    examples = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"--data {path}:{number}: not a JSON line") from None
            if "input_ids" not in record:
                if "text" not in record or tokenizer is None:
                    raise ValueError(f"--data {path}:{number}: needs 'input_ids', or 'text' and a tokenizer")
                record = {"input_ids": tokenizer(record["text"])["input_ids"]}
            examples.append(record)
    return examples


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="alphadiv-cache-teacher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="teacher causal LM: a folder or a Hugging Face model name")
    parser.add_argument("--data", required=True, help="JSON lines with 'input_ids' (or 'text', tokenized here)")
    parser.add_argument("--out", required=True, help="cache folder (created; an unfinished one is resumed)")
    parser.add_argument("--k", type=int, default=64, help="teacher classes kept per token (default 64)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the cached values")
    parser.add_argument("--dtype", choices=tuple(LOGPROB_DTYPES), default="float16", help="of the log-probabilities")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-examples", type=int, default=None, help="examples per shard (default ~1M tokens)")
    parser.add_argument("--vocab-size", type=int, default=None, help="head rows of the softmax (default: tokenizer)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or name (default: the model's, if any)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-dtype", choices=("float32", "bfloat16", "float16"), default=None)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        if args.k < 1:
            raise ValueError(f"--k must be >= 1, got {args.k}")
        try:
            config = AutoConfig.from_pretrained(args.model)
        except (OSError, ValueError) as error:
            raise ValueError(f"--model {args.model}: cannot load it ({str(error).splitlines()[0]})") from None
        rows = args.vocab_size or getattr(config, "vocab_size", None) or args.k
        if args.k > rows:  # before the weights load: bad settings cost nothing
            raise ValueError(f"k must be a whole number in [1, {rows}] (the teacher's classes), got {args.k}")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device here")
        tokenizer = None
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        except (OSError, ValueError, TypeError):
            if args.tokenizer:
                raise ValueError(f"--tokenizer {args.tokenizer}: cannot load it") from None
        examples = _read_examples(args.data, tokenizer)
        try:
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.model_dtype)
                                                         if args.model_dtype else None)
        except OSError as error:
            raise ValueError(f"--model {args.model}: cannot load it ({str(error).splitlines()[0]})") from None
        manifest = cache_teacher(model.to(args.device), examples, args.out, k=args.k, temperature=args.temperature,
                                 dtype=args.dtype, batch_size=args.batch_size, shard_examples=args.shard_examples,
                                 vocab_size=args.vocab_size, tokenizer=tokenizer, model_name=args.model)
    except ValueError as error:
        raise SystemExit(f"alphadiv-cache-teacher: error: {error}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    size = sum(os.path.getsize(_shard_path(args.out, shard)) for shard in range(manifest["shards"]))
    print(f"{args.out}: {manifest['examples']} examples, {manifest['tokens']} tokens, k={manifest['k']}, "
          f"{size / 1e6:.1f} MB ({size / max(manifest['tokens'], 1):.0f} MB per million tokens)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
