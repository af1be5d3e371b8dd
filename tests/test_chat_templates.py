"""jaxpost.chat_templates: built-in templates against the families' published templates rendered by
`transformers`, assistant spans from {% generation %} tags and from incremental rendering, and
the sandbox."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from jaxpost import assistant_spans, chat_templates
from jaxpost.chat_templates import BUILTIN_TEMPLATES, ChatTemplateError

# The templates the families publish in tokenizer_config.json (no {% generation %} tags):
# Meta-Llama-3-8B-Instruct, the generic ChatML one, gemma-2-9b-it.
LLAMA3_PUBLISHED = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML_PUBLISHED = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GEMMA2_PUBLISHED = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + "
    "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\\n'}}{% endif %}"
)
PUBLISHED = {"llama3": LLAMA3_PUBLISHED, "chatml": CHATML_PUBLISHED, "gemma": GEMMA2_PUBLISHED}
END_OF_TURN = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "gemma": "<end_of_turn>"}
VARIABLES = {"bos_token": "<BOS>", "eos_token": "<EOS>"}


@pytest.fixture
def rng() -> random.Random:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return random.Random(seed)


def _conversation(rng: random.Random, system: bool, end_with_assistant: bool) -> list[dict]:
    def content() -> str:
        words = [rng.choice(["alpha", "beta", "γ", "<b>&", "x\ny", "42"]) for _ in range(4)]
        return rng.choice(["", " ", "\n"]) + " ".join(words) + rng.choice(["", " ", "\n\n"])

    messages = [{"role": "system", "content": content()}] if system else []
    for _ in range(rng.randint(1, 3)):
        messages += [
            {"role": "user", "content": content()},
            {"role": "assistant", "content": content()},
        ]
    return messages if end_with_assistant else messages[:-1]


def _reference(template: str, messages: list[dict], add_generation_prompt: bool, **kw) -> str:
    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        **{**VARIABLES, **kw},
    )
    return rendered[0]


@pytest.mark.parametrize("name", ["llama3", "chatml", "gemma"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_builtin_renders_like_published_template(rng, name, add_generation_prompt):
    for _ in range(5):
        # Gemma 2's template rejects a system message; Gemma 3 folds it into the first user turn.
        system = name != "gemma" and rng.random() < 0.5
        messages = _conversation(rng, system, end_with_assistant=not add_generation_prompt)
        text, _ = chat_templates.render(
            BUILTIN_TEMPLATES[name], messages, add_generation_prompt, VARIABLES
        )
        assert text == _reference(PUBLISHED[name], messages, add_generation_prompt)


def test_gemma_builtin_folds_system_message_like_gemma3():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " hi "},
        {"role": "assistant", "content": "yo"},
    ]
    text, _ = chat_templates.render(BUILTIN_TEMPLATES["gemma"], messages, False, VARIABLES)
    expected = (
        "<BOS><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n"
        "<start_of_turn>model\nyo<end_of_turn>\n"
    )
    assert text == expected


@pytest.mark.parametrize("name", ["llama3", "chatml", "gemma"])
def test_generation_spans_hold_reply_and_end_of_turn(rng, name):
    for _ in range(5):
        messages = _conversation(rng, system=name != "gemma", end_with_assistant=True)
        text, spans = chat_templates.render(BUILTIN_TEMPLATES[name], messages, False, VARIABLES)
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        if name != "chatml":  # Llama 3 and Gemma trim message content
            replies = [r.strip() for r in replies]
        assert [text[a:b] for a, b in spans] == [r + END_OF_TURN[name] for r in replies]
        # Incremental rendering of the published (untagged) template finds the same spans.
        published = PUBLISHED[name]
        text2, spans2 = assistant_spans.by_prefix(published, messages, False, VARIABLES)
        assert (text2, spans2) == (text, spans)


def test_sandbox_and_helpers():
    def run(source: str) -> str:
        return chat_templates.render(source, [{"role": "user", "content": "hi"}], False, {})[0]

    assert run("{{ messages[0] | tojson }}") == '{"role": "user", "content": "hi"}'
    assert run("{{ '<b>' | tojson }}") == '"<b>"'  # no HTML escaping, unlike jinja's tojson
    assert run("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = 1 %}"
               "{% break %}{% endfor %}{{ ns.n }}") == "1"  # fmt: skip
    with pytest.raises(ChatTemplateError, match="rejected"):
        run("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError, match="rejected"):
        run("{% set ns = namespace(_x=1) %}")
    with pytest.raises(ChatTemplateError, match="rejected"):
        run("{{ messages.append(1) }}")  # immutable sandbox


def test_message_validation():
    with pytest.raises(ChatTemplateError, match="must be a list of dicts"):
        chat_templates.validate_messages("hello")
    with pytest.raises(ChatTemplateError, match="'content' of type int"):
        chat_templates.validate_messages([{"role": "user", "content": 3}])
    # None values are dropped (API responses carry content=None next to tool_calls).
    calls = [{"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}]
    assert chat_templates.validate_messages(calls) == [
        {"role": "assistant", "tool_calls": [{"name": "f"}]}
    ]


def test_template_sees_plain_data_only():
    import numpy as np

    class Rich(str):
        def leak(self) -> str:
            return "leaked"

    messages = [{"role": "user", "content": Rich("hi"), "n": np.int64(3), "x": np.zeros(2)}]
    source = "{{ messages[0].content }}|{{ messages[0].n + 1 }}|{{ messages[0].x }}"
    assert chat_templates.render(source, messages, False, {})[0] == "hi|4|<ndarray>"
    with pytest.raises(ChatTemplateError, match="rejected"):
        chat_templates.render("{{ messages[0].content.leak() }}", messages, False, {})


def test_generation_block_outside_top_level_is_an_error():
    # Inside {% set %} the block's output is buffered, so its offset at render time is wrong.
    source = (
        "{% for m in messages %}{% set turn %}[{{ m['role'] }}]"
        "{% generation %}{{ m['content'] }}{% endgeneration %}{% endset %}{{ turn }}{% endfor %}"
    )
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="move it to the template's top level"):
        chat_templates.render(source, messages, False, {})


# Qwen3's published template (Qwen/Qwen3-8B tokenizer_config.json): it drops past reasoning,
# writes a <think> block into the last reply only, and prompts `<think>\n\n</think>\n\n` when
# thinking is off, so a turn renders differently once the conversation goes on.
QWEN3_PUBLISHED = (Path(__file__).parent / "templates" / "qwen3.jinja").read_text()
_CALL = {"function": {"name": "f", "arguments": {"x": 1}}}
_CALL_TEXT = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'


@pytest.mark.parametrize(
    "messages, thinking, replies",
    [
        (  # past reasoning dropped; the last reply keeps its own
            ["u1", "<think>\nr1\n</think>\n\na1", "u2", "<think>\nr2\n</think>\n\na2"],
            None,
            ["a1", "<think>\nr2\n</think>\n\na2"],
        ),
        (["u1", "a1", "u2", "a2"], None, ["a1", "<think>\n\n</think>\n\na2"]),
        (["u1", "a1", "u2", "a2"], False, ["a1", "a2"]),  # the prompt holds the empty block
        # replies that start as the thinking-off prompt goes on (its "<think>"): whole
        (["u1", "<b>bold</b>", "u2", "<thinking"], False, ["<b>bold</b>", "<thinking"]),
        (  # a tool call with no text, its result, the answer
            ["u1", (None, _CALL), ("tool", "3"), "a2"],
            None,
            [_CALL_TEXT, "<think>\n\n</think>\n\na2"],
        ),
        (
            [("system", "s"), "u1", ("ok", _CALL), ("tool", "3"), "a2", "u3", "a3"],
            False,
            ["ok\n" + _CALL_TEXT, "a2", "a3"],
        ),
    ],
)
def test_spans_of_a_template_that_rewrites_earlier_turns(messages, thinking, replies):
    """Each reply's span is what the template writes for that turn in the whole conversation
    (the text the model sees), up to and including <|im_end|>, whatever it rewrites."""
    conversation, role = [], "user"
    for m in messages:
        if isinstance(m, tuple) and m[0] in ("system", "tool"):
            conversation.append({"role": m[0], "content": m[1]})
            continue
        message = {"role": role, "content": m if isinstance(m, str) else m[0]}
        if isinstance(m, tuple):
            message["tool_calls"] = [m[1]]
        conversation.append(message)
        role = "assistant" if role == "user" else "user"
        if isinstance(m, tuple):
            role = "assistant"  # the tool's result comes next, then the assistant again
    variables = {**VARIABLES, **({} if thinking is None else {"enable_thinking": thinking})}
    messages = chat_templates.validate_messages(conversation)
    text, spans = assistant_spans.by_prefix(QWEN3_PUBLISHED, messages, False, variables)
    assert text == _reference(QWEN3_PUBLISHED, conversation, False, **variables)
    assert [text[a:b] for a, b in spans] == [r + "<|im_end|>" for r in replies]


def test_a_template_that_rewrites_every_turn_is_an_error():
    """Turns numbered from the end change as the conversation grows: no span is defined."""
    template = (
        "{% for m in messages %}[{{ messages|length - loop.index0 }}]{{ m.content }}"
        "{% endfor %}{% if add_generation_prompt %}[a]{% endif %}"
    )
    messages = chat_templates.validate_messages(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * 2
    )
    with pytest.raises(ChatTemplateError, match="assistant message 1: the conversation before"):
        assistant_spans.by_prefix(template, messages, False, VARIABLES)
