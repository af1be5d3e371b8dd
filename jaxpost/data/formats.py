"""Row formats: validation, chat templating, tokenization, loss masks and truncation.

Formats (the keys a row must have; extra keys are ignored, except the optional `tools` and
`chat_template_kwargs`, which reach the chat template as TRL passes them):
  messages           messages: [{"role", "content"}, ...] with at least one assistant turn
  prompt_completion  prompt: str | messages, completion: str | messages
  text               text: str
  preference         prompt: str | messages, chosen: str | messages, rejected: str | messages
  prompt_answer      prompt: str | messages, answer: str | int (reference answer, for RL)

A tokenized sequence example holds `tokens` [L] int32, `targets` [L] int32 (the next token within
the example; the last position's target is pad) and `loss_mask` [L] float32 (1 where the target
is trained: assistant / completion tokens, or every real token for `text`). The tokenizer is any
object with `encode`, `bos_id`, `eos_id`, `pad_id` and, for chat rows, `encode_chat(messages,
add_generation_prompt) -> (ids, assistant_mask)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxpost import chat_templates
from jaxpost.data.sources import DataError, MalformedRow

FORMATS = ("messages", "prompt_completion", "text", "preference", "prompt_answer")
REQUIRED = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt_answer": ("prompt", "answer"),
}
TRUNCATION = ("error", "truncate_left", "truncate_right", "drop")


def _check_messages(value: Any, field: str, need_assistant: bool) -> None:
    if not isinstance(value, list) or not value:
        raise MalformedRow(f"{field!r} must be a non-empty list of messages, got {value!r:.60}")
    for i, m in enumerate(value):
        if problem := chat_templates.message_problem(m):
            raise MalformedRow(f"{field}[{i}] {problem}")
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        raise MalformedRow(f"{field!r} has no assistant message, so nothing would be trained")


def _check_text_or_messages(row: dict, field: str, need_assistant: bool = False) -> None:
    value = row[field]
    if isinstance(value, list):
        _check_messages(value, field, need_assistant)
    elif not isinstance(value, str):
        raise MalformedRow(
            f"{field!r} must be a string or a list of messages, got {type(value).__name__}"
        )


def has_content_parts(row: dict) -> bool:
    """Whether a message of the row has content given as a list of parts (which many chat
    templates, written for strings, cannot render)."""
    return any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        for value in row.values()
        if isinstance(value, list)
        for m in value
    )


def template_kwargs(row: dict) -> dict[str, Any]:
    """The chat template's per-row variables, as TRL passes them: the row's `tools` (function
    schemas the template lists) and its `chat_template_kwargs` (e.g. enable_thinking)."""
    out = dict(row.get("chat_template_kwargs") or {})
    if row.get("tools") is not None:
        out["tools"] = row["tools"]
    return out


def _check_template_kwargs(row: dict) -> None:
    tools, extra = row.get("tools"), row.get("chat_template_kwargs")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        raise MalformedRow(
            f"'tools' must be a list of objects (function schemas), got {tools!r:.60}"
        )
    if extra is not None and not (
        isinstance(extra, dict) and all(isinstance(k, str) for k in extra)
    ):
        raise MalformedRow(
            f"'chat_template_kwargs' must be an object of template variables, got {extra!r:.60}"
        )


def validate(row: dict, fmt: str) -> None:
    """Raise `MalformedRow` naming the missing or mistyped field; return None when usable."""
    if fmt not in REQUIRED:
        raise ValueError(f"data format {fmt!r} is not one of {FORMATS}")
    _check_template_kwargs(row)
    for key in REQUIRED[fmt]:
        if key not in row:
            # TRL tells the format from the keys; here it is data.format: say which would fit.
            fits = [f for f, keys in REQUIRED.items() if f != fmt and all(k in row for k in keys)]
            hint = f" (the row has the keys of format {fits[0]!r}: data.format)" if fits else ""
            raise MalformedRow(
                f"{key!r} is missing; expected keys {', '.join(REQUIRED[fmt])}{hint}"
            )
    if fmt == "messages":
        _check_messages(row["messages"], "messages", need_assistant=True)
    elif fmt == "text":
        if not isinstance(row["text"], str):
            raise MalformedRow(f"'text' must be a string, got {type(row['text']).__name__}")
    elif fmt == "prompt_answer":
        _check_text_or_messages(row, "prompt")
        answer = row["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int)):
            raise MalformedRow(f"'answer' must be a string or an int, got {type(answer).__name__}")
    else:
        for key in REQUIRED[fmt]:
            # What follows the prompt is what is trained: as messages, an assistant turn.
            _check_text_or_messages(row, key, need_assistant=key != "prompt")


def _as_messages(value: str | list, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _with_bos(tokenizer, ids: list[int]) -> list[int]:
    # Models trained without BOS before raw text (e.g. Qwen) say so with add_bos_default=False.
    # Text that already starts with BOS (its string was in the row) keeps the one it has, where
    # TRL's tokenizer call adds a second.
    bos = getattr(tokenizer, "bos_id", None)
    wanted = getattr(tokenizer, "add_bos_default", True)
    if bos is None or not wanted or (ids and ids[0] == bos):
        return list(ids)
    return [bos, *ids]


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    # Text that already ends in EOS (its string was in the row) keeps the one it has.
    eos = getattr(tokenizer, "eos_id", None)
    return list(ids) if eos is None or (ids and ids[-1] == eos) else [*ids, eos]


def encode_prompt(
    tokenizer, prompt: str | list, chat_template: bool = True, template_vars: dict | None = None
) -> list[int]:
    """The ids a model continues from: chat-templated with the generation prompt, or BOS + text.
    template_vars: the row's extra chat-template variables (`template_kwargs`)."""
    if isinstance(prompt, list) or chat_template:
        messages = _as_messages(prompt, "user")
        ids, _ = tokenizer.encode_chat(
            messages, add_generation_prompt=True, **(template_vars or {})
        )
        return list(ids)
    return _with_bos(tokenizer, tokenizer.encode(prompt))


def encode_pair(
    tokenizer,
    prompt: str | list,
    completion: str | list,
    chat_template: bool = True,
    completion_only: bool = True,
    template_vars: dict | None = None,
) -> tuple[list[int], list[int]]:
    """-> (ids, trained) for a prompt followed by a completion; trained marks completion tokens
    (with the chat template: assistant turns after the prompt, including their end token), or
    every token when not `completion_only`."""
    if isinstance(prompt, list) or isinstance(completion, list) or chat_template:
        tv = template_vars or {}
        prompt_msgs = _as_messages(prompt, "user")
        messages = prompt_msgs + _as_messages(completion, "assistant")
        if not completion_only:
            return _every_token(tokenizer.apply_chat_template(messages, tokenize=True, **tv))
        ids, mask = tokenizer.encode_chat(messages, add_generation_prompt=False, **tv)
        if any(m["role"] == "assistant" for m in prompt_msgs):
            # Assistant turns inside a multi-turn prompt are context here, not trained.
            n_prompt = len(tokenizer.encode_chat(prompt_msgs, add_generation_prompt=False, **tv)[0])
            mask = [0] * min(n_prompt, len(mask)) + list(mask[n_prompt:])
        return list(ids), [int(m) for m in mask]
    # Prompt and completion are one text, tokenized once, as TRL does: a prompt that ends inside
    # a pre-token (a trailing space, half a word) merges with the completion's first characters
    # there. The completion starts where that encoding parts from the prompt's own (TRL's
    # common_prefix_length); what the prompt alone ends with past that point is not trained on.
    ids = _with_eos(tokenizer, _with_bos(tokenizer, tokenizer.encode(prompt + completion)))
    if not completion_only:
        return _every_token(ids)
    prompt_ids = _with_bos(tokenizer, tokenizer.encode(prompt))
    n = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), len(prompt_ids))
    n = min(n, len(ids))
    return ids, [0] * n + [1] * (len(ids) - n)


def _every_token(ids) -> tuple[list[int], list[int]]:
    return list(ids), [1] * len(ids)


def encode_sft(
    tokenizer, row: dict, fmt: str, chat_template: bool = True, completion_only: bool = True
) -> tuple[list[int], list[int]]:
    """(ids, trained) for the sequence formats messages / prompt_completion / text.

    completion_only=False trains every token and locates no assistant turns, so it works with
    any chat template. (`encode_chat` locates a reply even where the template writes it
    differently once the conversation goes on, as Qwen3's drops past reasoning; it cannot
    where the template rewrites the turns before the reply, and raises.)"""
    tv = template_kwargs(row)
    if fmt == "messages":
        if not completion_only:
            return _every_token(tokenizer.apply_chat_template(row["messages"], tokenize=True, **tv))
        ids, mask = tokenizer.encode_chat(row["messages"], add_generation_prompt=False, **tv)
        return list(ids), [int(m) for m in mask]
    if fmt == "prompt_completion":
        return encode_pair(
            tokenizer, row["prompt"], row["completion"], chat_template, completion_only, tv
        )
    if fmt == "text":
        ids = _with_eos(tokenizer, _with_bos(tokenizer, tokenizer.encode(row["text"])))
        return ids, [1] * len(ids)
    raise ValueError(f"format {fmt!r} is not a sequence format (messages, prompt_completion, text)")


class Dropped(Exception):  # noqa: N818 - a filter signal, counted by the pipeline
    """The example is left out under the truncation policy; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def truncate(
    ids: Sequence[int], trained: Sequence[int], max_length: int, policy: str, where: str
) -> tuple[list[int], list[int]]:
    """Fit a sequence into max_length by `policy`; raise DataError ('error') or Dropped."""
    if policy not in TRUNCATION:
        raise ValueError(f"truncation policy {policy!r} is not one of {TRUNCATION}")
    n = len(ids)
    if n > max_length:
        n_prompt = next((i for i, t in enumerate(trained) if t), n)
        if policy == "error":
            what = (
                f"the prompt alone is {n_prompt} tokens"
                if n_prompt >= max_length
                else f"prompt {n_prompt} + completion {n - n_prompt} tokens"
            )
            raise DataError(
                f"{where}: {n} tokens exceed max_length {max_length} ({what}); set the "
                "truncation policy to 'truncate_left', 'truncate_right' or 'drop' to allow this"
            )
        if policy == "drop":
            raise Dropped(f"longer than max_length ({n} > {max_length})")
        keep = slice(0, max_length) if policy == "truncate_right" else slice(n - max_length, n)
        ids, trained = list(ids)[keep], list(trained)[keep]
    if not any(trained[1:]):
        raise Dropped(
            "no trained tokens left after truncation"
            if len(ids) < n
            else "no trained tokens (e.g. an empty text, or a completion of only its end token)"
        )
    return list(ids), list(trained)


def sequence_example(ids: Sequence[int], trained: Sequence[int], pad_id: int) -> dict:
    """tokens = ids, targets = ids shifted left (pad last), loss_mask = trained of the target."""
    tokens = np.asarray(ids, np.int32)
    targets = np.concatenate([tokens[1:], np.asarray([pad_id], np.int32)])
    loss_mask = np.concatenate([np.asarray(trained[1:], np.float32), np.zeros(1, np.float32)])
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}


@dataclasses.dataclass(frozen=True)
class Encoder:
    """row -> example for one format; raises MalformedRow, DataError or Dropped.

    Sequence formats give a `sequence_example`; preference gives one per side with prefixes
    `chosen_` / `rejected_`; prompt_answer gives `prompt_tokens` [L] int32 and `answer` (str).
    """

    tokenizer: Any
    fmt: str
    max_length: int
    truncation: str = "error"
    chat_template: bool = True
    # False: the loss covers every token of a messages / prompt_completion row, prompt and
    # template included (TRL's default for messages), not only completions and assistant turns.
    completion_only_loss: bool = True
    # Called as on_truncated(where, reason) for each row cut to fit (truncate_left / _right),
    # so the pipeline can count and show them as it does dropped rows.
    on_truncated: Callable[[str, str], None] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"data format {self.fmt!r} is not one of {FORMATS}")
        if self.truncation not in TRUNCATION:
            raise ValueError(f"truncation policy {self.truncation!r} is not one of {TRUNCATION}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")

    def __call__(self, row: dict, where: str) -> dict:
        validate(row, self.fmt)
        tok, pad = self.tokenizer, self.tokenizer.pad_id
        if self.fmt == "prompt_answer":
            ids = encode_prompt(tok, row["prompt"], self.chat_template, template_kwargs(row))
            if len(ids) > self.max_length:
                if self.truncation == "error":
                    raise DataError(
                        f"{where}: the prompt is {len(ids)} tokens, longer than max_length "
                        f"{self.max_length}; set the truncation policy to 'truncate_left' or "
                        "'drop' to allow this"
                    )
                if self.truncation == "drop":
                    raise Dropped(f"prompt longer than max_length ({len(ids)})")
                # Both truncations cut the front: the end holds the generation cue.
                self._note(where, len(ids))
                ids = ids[len(ids) - self.max_length :]
            return {"prompt_tokens": np.asarray(ids, np.int32), "answer": str(row["answer"])}
        if self.fmt == "preference":
            out = {}
            for side in ("chosen", "rejected"):
                ids, trained = encode_pair(
                    tok, row["prompt"], row[side], self.chat_template, True, template_kwargs(row)
                )
                n = len(ids)
                ids, trained = truncate(ids, trained, self.max_length, self.truncation, where)
                if len(ids) < n:
                    self._note(where, n)
                for k, v in sequence_example(ids, trained, pad).items():
                    out[f"{side}_{k}"] = v
            return out
        ids, trained = encode_sft(
            tok, row, self.fmt, self.chat_template, completion_only=self.completion_only_loss
        )
        n = len(ids)
        ids, trained = truncate(ids, trained, self.max_length, self.truncation, where)
        if len(ids) < n:
            self._note(where, n)
        return sequence_example(ids, trained, pad)

    def _note(self, where: str, n: int) -> None:
        if self.on_truncated is not None:
            self.on_truncated(where, f"{n} tokens cut to {self.max_length} ({self.truncation})")
