"""Chat templates: sandboxed jinja rendering, message validation and built-in family templates.

Templates render the way `transformers` renders them (same jinja environment options and helpers:
`raise_exception`, `tojson`, `strftime_now`, `namespace`, loop controls, and the
`{% generation %}...{% endgeneration %}` tag that marks assistant text), so a template taken from
a model's `tokenizer_config.json` produces the same string here as in `transformers`.

`render` returns the string and the character spans of every `{% generation %}` block; the
tokenizer turns those spans into the assistant-token mask. Templates without the tag get their
spans from `assistant_spans.by_prefix`, which renders the conversation incrementally.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

KNOWN_ROLES = ("system", "user", "assistant", "tool", "developer", "ipython")

# Built-in templates for the model families jaxpost supports, used when a tokenizer ships none.
# Each marks the assistant reply plus its end-of-turn token with {% generation %}, so the mask is
# exact; the newline that follows the end-of-turn token belongs to the template, not the reply.
# "llama3" renders like Meta-Llama-3-*-Instruct; "chatml" like Qwen2.5 / Qwen3 without their
# default system prompt and tool blocks; "gemma" like Gemma 3 (a system message is folded into the
# first user turn; Gemma 1 / 2 reject a system message instead) and requires user/model alternation.
_LLAMA3 = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_GEMMA = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/... "
    "after an optional system message') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<start_of_turn>model\\n' }}"
    "{% generation %}{{ message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<start_of_turn>' + message['role'] + '\\n' + (first_user_prefix if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>' }}"
    "{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "llama3": _LLAMA3,
    "chatml": _CHATML,
    "qwen": _CHATML,
    "gemma": _GEMMA,
}


class ChatTemplateError(ValueError):
    """A conversation the chat template cannot render, or a template that cannot be used."""


def resolve_template(name_or_source: str) -> str:
    """A built-in template's source by name, or `name_or_source` itself when it is jinja source."""
    if name_or_source in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name_or_source]
    if "{%" in name_or_source or "{{" in name_or_source:
        return name_or_source
    raise ChatTemplateError(
        f"chat template {name_or_source!r} is neither a built-in template name "
        f"({', '.join(sorted(BUILTIN_TEMPLATES))}) nor jinja source"
    )


def message_problem(message: Any) -> str | None:
    """What is wrong with one chat message (None if nothing), worded to follow its name.

    A message is a dict with a known 'role' and a 'content' (a string or a list of parts); an
    assistant message that calls tools may carry 'tool_calls' instead. A None value counts as
    absent, as in `transformers` (APIs return `content=None` beside tool calls).
    """
    if not isinstance(message, Mapping):
        return f"is a {type(message).__name__}; expected a dict with 'role' and 'content'"
    role = message.get("role")
    if role is None:
        return f"has no 'role'; expected one of {KNOWN_ROLES}"
    if role not in KNOWN_ROLES:
        return f"has unknown role {role!r}; expected one of {KNOWN_ROLES}"
    content = message.get("content")
    if content is None and not (role == "assistant" and message.get("tool_calls")):
        return f"(role {role!r}) is missing 'content'; expected a string or a list of parts"
    if content is not None and not isinstance(content, (str, list)):
        return (
            f"(role {role!r}) has 'content' of type {type(content).__name__}; expected a string "
            "or a list of content parts"
        )
    return None


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Checks a conversation (`message_problem`) and returns plain-dict copies with None-valued
    keys dropped (templates test for a missing key, as `transformers` expects)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(
            "messages must be a list of dicts with 'role' and 'content', "
            f"got {type(messages).__name__}"
        )
    if not messages:
        raise ChatTemplateError("messages is empty; expected at least one message")
    for i, message in enumerate(messages):
        if problem := message_problem(message):
            raise ChatTemplateError(f"message {i} {problem}")
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _plain(value: Any) -> Any:
    """A copy made of plain JSON-like types: the sandbox lets a template call any public method of
    an object it is given, so rich objects (arrays, images, str subclasses) are never handed over;
    anything unknown becomes an inert "<TypeName>" string (as in `transformers`)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (enums, numpy strings) carry extra methods: keep only the base value.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    item = getattr(value, "item", None)  # NumPy / JAX scalars
    if callable(item) and getattr(value, "shape", None) == ():
        return _plain(item())
    return f"<{type(value).__name__}>"


@dataclasses.dataclass
class _Tracker:
    """The rendering in progress: chunks emitted so far and the generation blocks found."""

    chunks: list[str] = dataclasses.field(default_factory=list)
    blocks: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (start, text)


# A context variable rather than state on the shared, cached environment, so concurrent renders
# stay apart.
_TRACKER: contextvars.ContextVar[_Tracker | None] = contextvars.ContextVar(
    "jaxpost_chat_template_tracker", default=None
)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}body{% endgeneration %}`: renders body and records its character span."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_record", [])
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _record(self, caller: Any) -> str:
        text = caller()
        tracker = _TRACKER.get()
        if tracker is not None:
            # Top-level output reaches the consumer of `generate()` chunk by chunk, so the chunks
            # joined so far are the text before this block (as in transformers); `render` checks
            # it, since a block inside a macro or {% set %} is buffered and lands elsewhere.
            tracker.blocks.append((sum(len(chunk) for chunk in tracker.chunks), text))
        return text


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace() minus underscore attributes, which could reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
) -> str:
    # jinja's own tojson escapes HTML characters, which would change what the model sees.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compiles jinja source in a sandbox (templates come from downloaded files: untrusted)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e} (line {e.lineno})") from e


def has_generation_tags(source: str) -> bool:
    return re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None


def render(
    source: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    variables: Mapping[str, Any],
) -> tuple[str, list[tuple[int, int]]]:
    """Renders validated `messages`: (text, [(start, end) char span of each generation block]).

    `variables` holds the special-token strings (bos_token, eos_token, ...) and any extra template
    arguments (tools, enable_thinking, ...). A `raise_exception` in the template, or any other
    rendering failure, becomes a `ChatTemplateError` carrying the template's message.
    """
    template = compile_template(source)
    tracker = _Tracker()
    context = _plain({"tools": None, "documents": None, **variables, "messages": messages})
    context["add_generation_prompt"] = bool(add_generation_prompt)
    token = _TRACKER.set(tracker)
    try:
        for chunk in template.generate(**context):
            tracker.chunks.append(chunk)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template rejected the conversation: {e}") from e
    finally:
        _TRACKER.reset(token)
    text = "".join(tracker.chunks)
    spans = []
    for start, block in tracker.blocks:
        if text[start : start + len(block)] != block:
            raise ChatTemplateError(
                "a {% generation %} block is rendered inside a macro, {% set %} block or filter, "
                "so its place in the output is unknown; move it to the template's top level"
            )
        spans.append((start, start + len(block)))
    return text, spans
