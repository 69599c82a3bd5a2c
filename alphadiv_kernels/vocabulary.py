"""Which output rows a student and a teacher share.

Models of one family share a tokenizer but often not the number of rows of their output projection: the
embedding of the larger one is padded to a multiple of 64 or 128 (Qwen2.5-7B has 152064 rows, Qwen2.5-0.5B
151936, for a tokenizer of 151665 tokens). The rows past the tokenizer never stand for a token, so the two
distributions are compared on the shared prefix of rows: the first `V` rows of both heads, `V` the smaller
row count unless `vocab_size` sets it. The rows past `V` take no part in either softmax (they get no
gradient). A tokenizer with more tokens than `V` means the heads do not share a vocabulary: an error.
"""
from __future__ import annotations

from typing import Optional


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


def shared_vocabulary(student_rows: int, teacher_rows: int, vocab_size: Optional[int] = None,
                      tokenizer_size: Optional[int] = None) -> int:
    """The number of leading rows of the two heads the loss compares (see the module doc).

    Args:
        student_rows, teacher_rows: rows of the student's and the teacher's output projection.
        vocab_size: the shared size, when set (at most either head's rows); default the smaller head.
        tokenizer_size: the tokens of the tokenizer (``len(tokenizer)``), when known: every token must have
            a row in both heads.
    """
    shared = min(student_rows, teacher_rows) if vocab_size is None else _count("vocab_size", vocab_size)
    if shared > min(student_rows, teacher_rows):
        raise ValueError(f"vocab_size={shared} exceeds the output rows of the student ({student_rows}) or the "
                         f"teacher ({teacher_rows})")
    if tokenizer_size is not None and _count("tokenizer size", tokenizer_size) > shared:
        raise ValueError(f"student and teacher do not share a vocabulary: the tokenizer has {tokenizer_size} "
                         f"tokens but the heads share only {shared} rows (student {student_rows}, teacher "
                         f"{teacher_rows}); distill between models of one tokenizer")
    return shared
