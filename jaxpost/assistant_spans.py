"""Assistant spans of a chat template without `{% generation %}` blocks, found by rendering the
conversation incrementally (`by_prefix`); `chat_templates.render` gives the spans of a template
with the blocks directly."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from jaxpost.chat_templates import ChatTemplateError, render


def by_prefix(
    source: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    variables: Mapping[str, Any],
) -> tuple[str, list[tuple[int, int]]]:
    """Assistant spans of a template without `{% generation %}`, by incremental rendering.

    For assistant message i, the reply starts where `messages[:i]` rendered with a generation prompt
    ends, and ends where `messages[:i+1]` rendered without one ends, minus trailing whitespace:
    so the span holds the reply and the end-of-turn text the template appends (`<|im_end|>`), not
    the newline separating turns.

    Some templates render a turn differently once the conversation goes on: Qwen3's drops past
    reasoning and writes an empty `<think>` block only into the last reply, and its generation
    prompt without thinking (`<think>\n\n</think>\n\n`) never appears before an earlier reply.
    There the reply is located in the full rendering itself (`_Turn`): the text trained
    is the whole conversation's, and each span holds what the template writes for that turn.
    """
    full, _ = render(source, messages, add_generation_prompt, variables)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head, _ = render(source, messages[:i], True, variables)
        upto, _ = render(source, messages[: i + 1], False, variables)
        if full.startswith(head) and full.startswith(upto):
            span = len(head), len(upto.rstrip())
        else:
            turn = _Turn(source, messages, i, add_generation_prompt, variables, full, head, upto)
            span = turn.span()
        if span[1] < span[0]:
            raise ChatTemplateError(
                f"cannot locate assistant message {i}: the template renders nothing for it"
            )
        spans.append(span)
    return full, spans


# Put before or after a reply to find where the template writes it (see _Turn).
_MARK = "\u2063jaxpost\u2063"


def _common_prefix_len(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


@dataclasses.dataclass
class _Turn:
    """Assistant message i of a conversation whose template renders that turn (or the
    generation prompt before it) differently in a longer conversation; `full` is the whole
    conversation rendered, `head` / `upto` the conversation before the turn with a generation
    prompt / up to the turn.

    The turns before it must render as they do in `full`. The reply starts where the generation
    prompt and `full` part (the role header they share, as TRL splits a prompt from a completion
    whose prompt is not a prefix), or where a mark put before the reply shows it, if earlier (a
    reply that starts as the prompt goes on, `<b>` after a `<think>` prompt). It ends where a
    mark put after the reply shows it, followed by the end-of-turn text (tool calls,
    `<|im_end|>`) the template writes after the reply when it ends the conversation, which
    `full` must hold there too.
    """

    source: str
    messages: list[dict[str, Any]]
    i: int
    add_generation_prompt: bool
    variables: Mapping[str, Any]
    full: str
    head: str
    upto: str

    def _with_content(self, content: str, upto_turn: bool = False) -> str:
        m = self.messages
        marked = [*m[: self.i], {**m[self.i], "content": content}, *m[self.i + 1 :]]
        if upto_turn:
            return render(self.source, marked[: self.i + 1], False, self.variables)[0]
        return render(self.source, marked, self.add_generation_prompt, self.variables)[0]

    def span(self) -> tuple[int, int]:
        i, full = self.i, self.full
        before, _ = render(self.source, self.messages[:i], False, self.variables)
        content = self.messages[i].get("content")
        content = "" if content is None else content  # a reply of tool calls only
        problem = None
        if not full.startswith(before):
            problem = "the conversation before it renders differently once it goes on"
        elif not isinstance(content, str):
            problem = "its content is given as parts, so it cannot be marked"
        if problem is None:
            reply_end = _common_prefix_len(full, self._with_content(content + _MARK))
            # (a template that drops a leading mark, as Qwen3's with reasoning, changes nothing)
            reply_start = _common_prefix_len(full, self._with_content(_MARK + content))
            start = min(_common_prefix_len(self.head, full), reply_start, reply_end)
            upto_marked = self._with_content(content + _MARK, upto_turn=True)
            close = self.upto[_common_prefix_len(self.upto, upto_marked) :].rstrip()
            if start < len(before):
                problem = "its reply is not where the generation prompt ends"
            elif not full.startswith(close, reply_end):
                problem = f"the end of its turn ({close!r}) does not follow its reply"
            else:
                return start, reply_end + len(close)
        raise ChatTemplateError(
            f"cannot locate assistant message {i}: {problem}; use a template with "
            "{% generation %} blocks, or train on every token (data.completion_only_loss=False)"
        )
