"""Built-in procedurally generated tasks with verifiable answers.

`get(name)` returns a `Task`: its tokenizer, a deterministic split generator, the answer scorer
(held-out metric and RL reward) and how many tokens a completion needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jaxpost.data.tasks import arithmetic
from jaxpost.data.tasks.char_tokenizer import CharTokenizer


@dataclasses.dataclass(frozen=True)
class Task:
    """name; tokenizer() -> tokenizer object; generate_split(seed, n, split, **knobs) -> rows
    (`messages`, `prompt`/`completion`, `prompt`/`answer`); extract_answer(text) -> str | None;
    score(completion, answer) -> float in [0, 1]; max_new_tokens: enough for any completion."""

    name: str
    tokenizer: Callable[[], CharTokenizer]
    generate_split: Callable[..., list[dict]]
    extract_answer: Callable[[str], str | None]
    score: Callable[[str, str], float]
    max_new_tokens: int


TASKS: dict[str, Task] = {
    "arithmetic": Task(
        name="arithmetic",
        tokenizer=arithmetic.tokenizer,
        generate_split=arithmetic.generate_split,
        extract_answer=arithmetic.extract_answer,
        score=arithmetic.score,
        # 3-digit solutions are <= 36 characters + <eos>; margin for longer digit knobs.
        max_new_tokens=48,
    ),
}


def get(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks are {sorted(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "CharTokenizer", "Task", "arithmetic", "get"]
