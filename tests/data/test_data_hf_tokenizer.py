"""The pipeline with a real HF tokenizer (jaxpost.tokenizer over a byte-level BPE trained here):
token ids match transformers' chat template, and the loss mask covers exactly the replies."""

import bpe_tokenizer
import numpy as np
import pytest
import transformers

from jaxpost import tokenizer
from jaxpost.data import Pipeline, formats
from jaxpost.data.sources import DataError
from jaxpost.data.tasks import arithmetic


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe")
    bpe_tokenizer.save(path)
    return path


def test_messages_with_hf_tokenizer(hf_dir):
    tok = tokenizer.load(hf_dir)
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    rows = arithmetic.generate_split(int(np.random.default_rng().integers(1000)), 12, "test")
    pipe = Pipeline(
        rows,
        tok,
        format="messages",
        max_length=128,
        batch_size=3,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
        process_index=0,
        process_count=1,
    )
    examples = {}  # packing reorders examples, so they are matched by content
    for b in pipe.iterator():
        for r in range(b["tokens"].shape[0]):
            for s in range(1, int(b["segment_ids"][r].max()) + 1):
                sel = b["segment_ids"][r] == s
                ex = {k: b[k][r][sel] for k in ("tokens", "targets", "loss_mask")}
                examples[tuple(ex["tokens"].tolist())] = ex
    assert len(examples) == 12
    for row in rows:
        text = hf.apply_chat_template(row["messages"], tokenize=False)
        want = hf(text, add_special_tokens=False)["input_ids"]  # the template writes BOS
        ex = examples[tuple(want)]
        trained = ex["targets"][ex["loss_mask"] > 0]
        assert tok.decode(trained) == row["completion"] + "<|im_end|>"


def test_text_and_prompt_answer_with_hf_tokenizer(hf_dir):
    tok = tokenizer.load(hf_dir)
    rows = [{"text": "12+30\nanswer: 42", "prompt": "12+30", "answer": "42"}] * 4
    common = dict(max_length=64, batch_size=2, packing=False, process_index=0, process_count=1)
    b = next(Pipeline(rows, tok, format="text", **common).iterator())
    n = int(b["segment_ids"][0].sum())
    ids = b["tokens"][0][:n].tolist()
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and ids[-1] == tok.eos_id
    assert tok.decode(ids[1:-1]) == rows[0]["text"]
    assert b["loss_mask"][0].sum() == n - 1
    b = next(Pipeline(rows, tok, format="prompt_answer", **common).iterator())
    n = int(b["prompt_lengths"][0])
    prompt = tok.decode(b["prompt_tokens"][0][:n])
    assert prompt == "<|begin|><|im_start|>user\n12+30<|im_end|>\n<|im_start|>assistant\n"
    assert b["answer"].tolist() == ["42", "42"]


# Earlier assistant turns lose their reasoning once a later user turn follows (as Qwen3's
# template drops past <think> blocks), so a conversation's per-turn renderings are not prefixes
# of the whole one and its assistant turns cannot be located without {% generation %} blocks.
REWRITING_TEMPLATE = (
    "{% set ns = namespace(last_user=0) %}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' and loop.index0 > ns.last_user %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{{ m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_template_rewriting_earlier_turns_masks_each_reply_or_trains_every_token(hf_dir):
    """A template that writes an empty <think> block into replies after the last user turn only
    (as Qwen3's): each reply is trained as the whole conversation renders it; with
    completion_only_loss=False every token is."""
    tok = tokenizer.load(hf_dir, chat_template=REWRITING_TEMPLATE)
    messages = [
        {"role": "user", "content": "12+3"},
        {"role": "assistant", "content": "15"},
        {"role": "user", "content": "4-2"},
        {"role": "assistant", "content": "2"},
    ]
    common = dict(max_length=128, batch_size=1, packing=False, process_index=0, process_count=1)
    common.update(shuffle=False, num_epochs=1)
    rows = [{"messages": messages}]
    batch = next(Pipeline(rows, tok, format="messages", **common).iterator())
    trained = batch["targets"][0][batch["loss_mask"][0] > 0].tolist()
    assert tok.decode(trained) == "15<|im_end|><think>\n\n</think>\n\n2<|im_end|>"
    batch = next(
        Pipeline(rows, tok, format="messages", completion_only_loss=False, **common).iterator()
    )
    want = tok.apply_chat_template(messages, tokenize=True)
    n = len(want)
    assert batch["tokens"][0][:n].tolist() == want
    assert batch["loss_mask"][0][: n - 1].all() and not batch["loss_mask"][0][n - 1 :].any()


# ChatML with tool schemas, tool calls and an enable_thinking switch, as Qwen-style templates
# render them; assistant turns inside {% generation %} for the mask.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\\nTools:{% for t in tools %} {{ t['function']['name'] }}"
    "{% endfor %}<|im_end|>\\n{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}"
    "{% if m['content'] is defined %}{{ m['content'] }}{% endif %}"
    "{% for c in m.get('tool_calls', []) %}<tool_call>{{ c['function']['name'] }}"
    "{{ c['function']['arguments'] | tojson }}</tool_call>{% endfor %}<|im_end|>{% endgeneration %}"
    "{{ '\\n' }}{% else %}{{ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    "{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
TOOL_MESSAGES = [
    {"role": "user", "content": "12+30"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 12}}}],
    },
    {"role": "tool", "content": "42"},
    {"role": "assistant", "content": "answer: 42"},
]


def test_tool_calls_tools_and_template_kwargs_reach_the_template_as_in_transformers(hf_dir):
    from jaxpost.data import formats

    tok = tokenizer.load(hf_dir, chat_template=TOOL_TEMPLATE)
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf.chat_template = TOOL_TEMPLATE
    row = {"messages": TOOL_MESSAGES, "tools": TOOLS}
    ex = formats.Encoder(tok, "messages", max_length=256)(row, "row 1")
    want = hf.apply_chat_template(
        TOOL_MESSAGES, tools=TOOLS, return_dict=True, return_assistant_tokens_mask=True
    )
    n = len(want["input_ids"])
    assert ex["tokens"][:n].tolist() == want["input_ids"]
    # loss_mask marks targets: token t + 1 is trained where the mask of position t + 1 is 1.
    assert ex["loss_mask"][: n - 1].tolist() == want["assistant_masks"][1:]
    assert "<tool_call>add" in tok.decode(ex["targets"][ex["loss_mask"] > 0])

    # A prompt row's chat_template_kwargs (enable_thinking) reach the generation prompt.
    prompt = {"prompt": "12+30", "answer": "42", "chat_template_kwargs": {"enable_thinking": False}}
    got = formats.Encoder(tok, "prompt_answer", max_length=256)(prompt, "row 2")
    want = hf.apply_chat_template(
        [{"role": "user", "content": "12+30"}],
        add_generation_prompt=True,
        enable_thinking=False,
        return_dict=True,
    )["input_ids"]
    assert got["prompt_tokens"].tolist() == want and "<think></think>" in tok.decode(want)

    for bad, message in (
        ({"tools": {"add": 1}}, "'tools' must be a list"),
        ({"chat_template_kwargs": ["x"]}, "'chat_template_kwargs' must be an object"),
    ):
        with pytest.raises(Exception, match=message):
            formats.validate({**row, **bad}, "messages")
    no_calls = [{"role": "user", "content": "1"}, {"role": "assistant", "content": None}]
    with pytest.raises(Exception, match=r"messages\[1\] \(role 'assistant'\) is missing 'content'"):
        formats.validate({"messages": no_calls}, "messages")


@pytest.mark.parametrize(
    "prompt, completion",
    [
        ("12+3= ", "15"),  # the trailing space merges with the completion: 'Ġ' + '1' -> 'Ġ1'
        ("1", "2+3"),  # half a number: '1' + '2' -> '12'
        ("12+3 =", " 15"),  # a token boundary: nothing merges
    ],
)
def test_raw_prompt_completion_tokenizes_as_trl(hf_dir, prompt, completion):
    """data.chat_template=False: TRL's SFTTrainer tokenizes prompt + completion + EOS as one
    text and trains from where that encoding parts from the prompt's own (its
    common_prefix_length); with completion_only_loss=False every token. Reference: the same
    rule over transformers' tokenizer (prompt and completion were encoded apart here, which
    changed the tokens at the join and trained 'Ġ' as prompt)."""
    tok = tokenizer.load(hf_dir)
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    joint = hf(prompt + completion + hf.eos_token)["input_ids"]
    alone = hf(prompt)["input_ids"]
    n = next((i for i, (a, b) in enumerate(zip(alone, joint)) if a != b), len(alone))
    row = {"prompt": prompt, "completion": completion}
    for completion_only, first_trained in ((True, n), (False, 1)):
        enc = formats.Encoder(
            tok, "prompt_completion", 64, chat_template=False, completion_only_loss=completion_only
        )
        ex = enc(row, "mem row 1")
        assert ex["tokens"].tolist() == joint
        # loss_mask[i] trains target i = token i + 1
        want = [0.0] * (first_trained - 1) + [1.0] * (len(joint) - first_trained) + [0.0]
        assert ex["loss_mask"].tolist() == want, (completion_only, n)


def test_content_parts_a_template_cannot_render_are_named(hf_dir):
    """Content as a list of parts passes validation (some templates render parts); a template
    written for strings then fails, and the error says that is why."""
    tok = tokenizer.load(hf_dir)
    parts = [{"type": "text", "text": "12+3"}]
    row = {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "15"}]}
    pipe = Pipeline(
        [row], tok, format="messages", max_length=64, batch_size=1, process_index=0,
        process_count=1,
    )  # fmt: skip
    with pytest.raises(DataError, match="row 1: could not tokenize .* a list of parts; this chat"):
        next(pipe.iterator())
