"""Built-in verifiable task: multi-digit addition / subtraction with a worked column solution.

A problem is `347+85`; the assistant answers with one step per column, least significant first,
writing the carry (`+1`) or borrow (`-1`, and `1x` when the column borrows) it uses, then a final
answer line:
    user:      347+85
    assistant: 7+5=12 4+8+1=13 3+0+1=4
               answer: 432
Each step is local (two digits and a carry), which is what lets a model of a few million
parameters learn it from scratch on a CPU in minutes; the final answer is exactly checkable, so
the same scorer is the held-out metric and the verifiable reward for RL.

Splits are disjoint by construction: a problem's split is a fixed hash of its text (independent
of the seed), and `generate_split(seed, n, split)` samples only problems of that split, so no
test problem ever appears in any train split.
"""

from __future__ import annotations

import json
import os
import random
import re
import zlib
from collections.abc import Iterable, Sequence

from jaxpost.data.tasks.char_tokenizer import CharTokenizer

ALPHABET = "0123456789+-=: \nanswer"
ANSWER_PREFIX = "answer: "
_ANSWER_RE = re.compile(r"answer:\s*(-?\d+)")
SPLITS = ("train", "test")


def tokenizer() -> CharTokenizer:
    """The task's character tokenizer (28 symbols including 6 special tokens)."""
    return CharTokenizer(ALPHABET)


def split_of(problem: str, test_percent: int = 10) -> str:
    """'test' for a fixed `test_percent`% of all problems (by CRC32 of the text), else 'train'."""
    return "test" if zlib.crc32(problem.encode()) % 100 < test_percent else "train"


def _digits(x: int, width: int) -> list[int]:
    return [(x // 10**i) % 10 for i in range(width)]


def solve(a: int, op: str, b: int) -> tuple[str, int]:
    """-> (worked solution ending in the answer line, result). Requires a >= b >= 0 for '-'."""
    width = len(str(max(a, b)))
    da, db = _digits(a, width), _digits(b, width)
    steps = []
    if op == "+":
        carry = 0
        for x, y in zip(da, db):
            s = x + y + carry
            steps.append(f"{x}+{y}" + ("+1" if carry else "") + f"={s}")
            carry = s // 10
        result = a + b
    elif op == "-":
        if a < b:
            raise ValueError(f"subtraction needs a >= b, got {a}-{b}")
        borrow = 0
        for x, y in zip(da, db):
            need = int(x - borrow < y)  # this column borrows 10 from the next
            top = x + 10 * need
            steps.append(f"{top}" + ("-1" if borrow else "") + f"-{y}={top - borrow - y}")
            borrow = need
        result = a - b
    else:
        raise ValueError(f"operator {op!r} is not one of '+', '-'")
    return " ".join(steps) + "\n" + ANSWER_PREFIX + str(result), result


def _operand(rng: random.Random, min_digits: int, max_digits: int) -> int:
    d = rng.randint(min_digits, max_digits)
    return rng.randint(10 ** (d - 1) if d > 1 else 0, 10**d - 1)


def generate_split(
    seed: int,
    n: int,
    split: str = "train",
    *,
    min_digits: int = 2,
    max_digits: int = 3,
    ops: Sequence[str] = ("+", "-"),
    test_percent: int = 10,
) -> list[dict]:
    """`n` distinct problems of `split`, deterministic given all arguments.

    Each row carries every format the pipeline reads: `messages` (user problem + assistant
    solution), `prompt` / `completion`, and `prompt` / `answer` (the reference answer, a string).
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    for op in ops:
        if op not in ("+", "-"):
            raise ValueError(f"operator {op!r} is not one of '+', '-'")
    # Seeds of the two splits are decorrelated so equal seeds do not give aligned draws.
    rng = random.Random(f"arithmetic/{split}/{seed}")
    rows: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(
                f"could only find {len(rows)} distinct {split} problems of {n} requested with "
                f"{min_digits}-{max_digits} digits and ops {tuple(ops)}; ask for fewer or "
                "widen the digit range"
            )
        a, b = _operand(rng, min_digits, max_digits), _operand(rng, min_digits, max_digits)
        op = rng.choice(list(ops))
        if op == "-" and a < b:
            a, b = b, a
        problem = f"{a}{op}{b}"
        if problem in seen or split_of(problem, test_percent) != split:
            continue
        seen.add(problem)
        completion, result = solve(a, op, b)
        rows.append(
            {
                "id": f"{split}-{seed}-{len(rows)}",
                "prompt": problem,
                "completion": completion,
                "answer": str(result),
                "messages": [
                    {"role": "user", "content": problem},
                    {"role": "assistant", "content": completion},
                ],
            }
        )
    return rows


def extract_answer(text: str) -> str | None:
    """The integer on the last `answer:` line of `text`, normalised (no leading zeros), or None."""
    found = _ANSWER_RE.findall(text)
    return str(int(found[-1])) if found else None


def score(completion: str, answer: str) -> float:
    """1.0 when the completion's final answer equals the reference exactly, else 0.0.

    Also the verifiable reward for RL: (completion text, reference answer) -> reward.
    """
    got = extract_answer(completion)
    return float(got is not None and got == str(int(answer)))


def accuracy(completions: Sequence[str], answers: Sequence[str]) -> float:
    """Mean exact-match score; the lists must have equal length."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} reference answers")
    if not completions:
        raise ValueError("accuracy of an empty list of completions is undefined")
    return sum(score(c, a) for c, a in zip(completions, answers)) / len(completions)


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> int:
    """Write rows one JSON object per line (atomically: temp file then rename); -> row count."""
    tmp = f"{os.fspath(path)}.tmp"
    count = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            count += 1
    os.replace(tmp, path)
    return count
