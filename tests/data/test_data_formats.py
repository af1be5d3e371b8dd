"""Formats: validation errors, chat templating, completion-only loss masks, truncation policies."""

import numpy as np
import pytest

from jaxpost.data import formats
from jaxpost.data.sources import DataError, MalformedRow
from jaxpost.data.tasks.arithmetic import tokenizer

TOK = tokenizer()


def _decode_trained(ex):
    """Text of the targets the loss trains on, in order (from the example's own arrays)."""
    return TOK.decode(ex["targets"][ex["loss_mask"] > 0])


def test_messages_mask_trains_assistant_turns_only():
    rows = [
        {"role": "system", "content": "1+1"},
        {"role": "user", "content": "12+3"},
        {"role": "assistant", "content": "15"},
        {"role": "user", "content": "4-2"},
        {"role": "assistant", "content": "answer: 2"},
    ]
    enc = formats.Encoder(TOK, "messages", max_length=64)
    ex = enc({"messages": rows, "extra": 1}, "mem row 1")
    assert _decode_trained(ex) == "15<eos>answer: 2<eos>"
    # targets are the next token within the example; the last position is pad and untrained
    np.testing.assert_array_equal(ex["targets"][:-1], ex["tokens"][1:])
    assert ex["targets"][-1] == TOK.pad_id and ex["loss_mask"][-1] == 0
    assert ex["tokens"].dtype == np.int32 and ex["loss_mask"].dtype == np.float32


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion"])
def test_completion_only_loss_false_trains_every_token(fmt):
    """As TRL's default for messages: every target of the row is trained, prompt included."""
    row = {
        "prompt": "12+3",
        "completion": "15",
        "messages": [{"role": "user", "content": "12+3"}, {"role": "assistant", "content": "15"}],
    }
    ex = formats.Encoder(TOK, fmt, 64, completion_only_loss=False)(row, "mem row 1")
    assert ex["loss_mask"][:-1].all() and ex["loss_mask"][-1] == 0
    assert _decode_trained(ex) == TOK.decode(ex["tokens"][1:])
    only = formats.Encoder(TOK, fmt, 64)(row, "mem row 1")
    np.testing.assert_array_equal(only["tokens"], ex["tokens"])
    assert _decode_trained(only) == "15<eos>"


@pytest.mark.parametrize("chat", [True, False])
def test_prompt_completion_mask(chat):
    enc = formats.Encoder(TOK, "prompt_completion", max_length=64, chat_template=chat)
    ex = enc({"prompt": "12+30", "completion": "answer: 42"}, "mem row 1")
    assert _decode_trained(ex) == "answer: 42<eos>"
    prefix = "<bos><user>12+30<eos><assistant>" if chat else "<bos>12+30"
    assert TOK.decode(ex["tokens"]) == prefix + "answer: 42<eos>"


def test_multi_turn_prompt_assistant_turns_are_context():
    prompt = [
        {"role": "user", "content": "1+1"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2"},
    ]
    ex = formats.Encoder(TOK, "prompt_completion", 64)(
        {"prompt": prompt, "completion": "4"}, "mem row 1"
    )
    assert _decode_trained(ex) == "4<eos>"


def test_text_trains_every_real_token():
    ex = formats.Encoder(TOK, "text", 64)({"text": "12 34"}, "mem row 1")
    assert TOK.decode(ex["tokens"]) == "<bos>12 34<eos>"
    assert _decode_trained(ex) == "12 34<eos>"
    # Text that already ends in EOS keeps that one (TRL appends EOS only when it is missing);
    # so does a raw completion.
    ex = formats.Encoder(TOK, "text", 64)({"text": "12 34<eos>"}, "mem row 2")
    assert TOK.decode(ex["tokens"]) == "<bos>12 34<eos>"
    enc = formats.Encoder(TOK, "prompt_completion", 64, chat_template=False)
    ex = enc({"prompt": "1+1", "completion": "2<eos>"}, "mem row 3")
    assert TOK.decode(ex["tokens"]) == "<bos>1+12<eos>"


def test_preference_sides_share_prompt():
    ex = formats.Encoder(TOK, "preference", 64)(
        {"prompt": "2+2", "chosen": "answer: 4", "rejected": "answer: 5"}, "mem row 1"
    )
    assert TOK.decode(ex["chosen_targets"][ex["chosen_loss_mask"] > 0]) == "answer: 4<eos>"
    assert TOK.decode(ex["rejected_targets"][ex["rejected_loss_mask"] > 0]) == "answer: 5<eos>"
    n = len(TOK.encode_chat([{"role": "user", "content": "2+2"}], True)[0])
    np.testing.assert_array_equal(ex["chosen_tokens"][:n], ex["rejected_tokens"][:n])


def test_prompt_answer_ends_with_generation_cue():
    ex = formats.Encoder(TOK, "prompt_answer", 64)({"prompt": "7+8", "answer": 15}, "r")
    assert TOK.decode(ex["prompt_tokens"]) == "<bos><user>7+8<eos><assistant>"
    assert ex["answer"] == "15"


@pytest.mark.parametrize(
    "fmt,row,message",
    [
        ("messages", {"msgs": []}, "'messages' is missing; expected keys messages"),
        (
            "messages",
            {"prompt": "a", "completion": "b"},
            "'messages' is missing; expected keys messages (the row has the keys of format "
            "'prompt_completion': data.format)",
        ),
        ("preference", {"prompt": "a", "rejected": "b"}, "'chosen' is missing"),
        ("text", {"text": 3}, "'text' must be a string, got int"),
        ("prompt_completion", {"prompt": "a", "completion": None}, "'completion' must be"),
        ("prompt_answer", {"prompt": "a", "answer": [1]}, "'answer' must be a string or an int"),
        (
            "messages",
            {"messages": [{"role": "user"}]},
            "messages[0] (role 'user') is missing 'content'",
        ),
        ("messages", {"messages": [{"role": "user", "content": "1"}]}, "no assistant message"),
        ("messages", {"messages": "hi"}, "non-empty list of messages"),
        (  # what follows the prompt is trained: as messages it needs an assistant turn
            "prompt_completion",
            {"prompt": "a", "completion": [{"role": "user", "content": "b"}]},
            "'completion' has no assistant message",
        ),
        (
            "preference",
            {"prompt": "a", "chosen": "b", "rejected": [{"role": "tool", "content": "c"}]},
            "'rejected' has no assistant message",
        ),
    ],
)
def test_validation_names_the_field(fmt, row, message):
    with pytest.raises(MalformedRow) as err:
        formats.validate(row, fmt)
    assert message in str(err.value)


def _long_row():
    return {"prompt": "1234567890" * 2, "completion": "answer: 1234567890"}


def test_truncation_error_names_row_and_prompt():
    enc = formats.Encoder(TOK, "prompt_completion", 16, truncation="error")
    with pytest.raises(DataError, match=r"train.jsonl row 7: .* max_length 16 \(the prompt alone"):
        enc(_long_row(), "train.jsonl row 7")


def test_truncation_policies():
    row = _long_row()
    full = formats.Encoder(TOK, "prompt_completion", 128)(row, "r")
    n = len(full["tokens"])
    left = formats.Encoder(TOK, "prompt_completion", 30, truncation="truncate_left")(row, "r")
    np.testing.assert_array_equal(left["tokens"], full["tokens"][n - 30 :])
    assert _decode_trained(left) == "answer: 1234567890<eos>"
    # truncate_right keeping the prompt and part of the completion
    right = formats.Encoder(TOK, "prompt_completion", 30, truncation="truncate_right")(row, "r")
    np.testing.assert_array_equal(right["tokens"], full["tokens"][:30])
    assert right["loss_mask"][-1] == 0 and right["loss_mask"].sum() > 0
    with pytest.raises(formats.Dropped, match="longer than max_length"):
        formats.Encoder(TOK, "prompt_completion", 30, truncation="drop")(row, "r")
    # cutting off the whole completion leaves nothing to train: dropped, not silently kept
    with pytest.raises(formats.Dropped, match="no trained tokens left after truncation"):
        formats.Encoder(TOK, "prompt_completion", 16, truncation="truncate_right")(row, "r")
    # a row with nothing to train in the first place is not said to be truncated
    with pytest.raises(formats.Dropped, match=r"^no trained tokens \(e.g. an empty text"):
        formats.truncate([1, 2, 3], [0, 0, 0], 16, "error", "r")


def test_prompt_answer_too_long():
    row = {"prompt": "1234567890" * 3, "answer": "1"}
    with pytest.raises(DataError, match="row 3: the prompt is 34 tokens, longer than max_length"):
        formats.Encoder(TOK, "prompt_answer", 20)(row, "x.jsonl row 3")
    ex = formats.Encoder(TOK, "prompt_answer", 20, truncation="truncate_left")(row, "r")
    assert TOK.decode(ex["prompt_tokens"]).endswith("<eos><assistant>")
    assert len(ex["prompt_tokens"]) == 20


def test_bad_options():
    with pytest.raises(ValueError, match="truncation policy 'cut'"):
        formats.Encoder(TOK, "text", 8, truncation="cut")
    with pytest.raises(ValueError, match="data format 'chat' is not one of"):
        formats.Encoder(TOK, "chat", 8)
