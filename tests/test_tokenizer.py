"""jaxpost.tokenizer against `tokenizers`, `sentencepiece` and `transformers` on tokenizers trained
here: a byte-level BPE (tokenizers trainer, saved by transformers with a chat template) and a
SentencePiece BPE model (sentencepiece trainer, Llama/Gemma-style normalization)."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil

import bpe_tokenizer
import pytest
import sentencepiece as spm
import tokenizers
import transformers

from jaxpost import tokenizer
from jaxpost.chat_templates import ChatTemplateError

WORDS = (
    "the cat dog sat on mat a big small red blue house tree run jump hello world how are you "
    "fine thanks what is two plus three answer"
).split()
BPE_SPECIALS = ["<|endoftext|>", "<|begin|>", "<|im_start|>", "<|im_end|>"]
SP_SPECIALS = ["<start_of_turn>", "<end_of_turn>"]
# ChatML with the assistant reply and its <|im_end|> inside {% generation %} (TRL convention).
CHATML_TAGGED = (
    "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_PLAIN = bpe_tokenizer.CHATML


def _sentences(rng: random.Random, n: int) -> list[str]:
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".?!")
        for _ in range(n)
    ]


@pytest.fixture
def rng() -> random.Random:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return random.Random(seed)


def _random_text(rng: random.Random, specials: list[str], lead_space: bool = True) -> str:
    """Words, odd spacing, newlines, digits, non-ASCII and special-token strings."""
    pieces = []
    for _ in range(rng.randint(1, 14)):
        r = rng.random()
        if r < 0.55:
            pieces.append(rng.choice(WORDS))
        elif r < 0.65:
            pieces.append(rng.choice(specials))
        elif r < 0.75:
            pieces.append(rng.choice(["é", "中文", "ß", "🙂", "naïve", "Ω"]))
        elif r < 0.85:
            pieces.append(str(rng.randint(0, 9999)))
        else:
            pieces.append(rng.choice(["  ", "\n", "\n\n", "\t", "?", ", "]))
    text = rng.choice(["", " ", ""]).join(pieces)
    return text if lead_space else text.lstrip()


def _conversation(rng: random.Random, end_with_assistant: bool) -> list[dict[str, str]]:
    def content() -> str:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
        return text + rng.choice(["", ".", "!", " 42", " é"])

    messages = [{"role": "system", "content": content()}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        messages += [
            {"role": "user", "content": content()},
            {"role": "assistant", "content": content()},
        ]
    return messages if end_with_assistant else messages[:-1]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> str:
    """Byte-level BPE with a BOS-adding post-processor (Llama 3 style), saved by transformers."""
    path = tmp_path_factory.mktemp("bpe")
    tok = bpe_tokenizer.save(
        path,
        texts=_sentences(random.Random(0), 400),
        vocab_size=300,
        specials=BPE_SPECIALS,
        pad_token="<|endoftext|>",
        chat_template=CHATML_TAGGED,
    )
    (path / "generation_config.json").write_text(
        json.dumps(
            {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id(BPE_SPECIALS[0])]}
        )
    )
    return str(path)


# Llama 2 style (dummy-prefix space, <s> </s>) and Gemma style (no dummy prefix, <bos> <eos>).
SP_STYLES = {
    "llama": dict(
        add_dummy_prefix=True,
        pieces={"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"},
        hf_class="LlamaTokenizer",
    ),
    "gemma": dict(
        add_dummy_prefix=False,
        pieces={"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"},
        hf_class="GemmaTokenizer",
    ),
}


@pytest.fixture(scope="module", params=sorted(SP_STYLES))
def sp_dir(request, tmp_path_factory) -> str:
    """SentencePiece BPE with byte fallback and control symbols, identity normalization (as Llama
    and Gemma), with a tokenizer_config.json holding the chat template inline."""
    style = SP_STYLES[request.param]
    path = tmp_path_factory.mktemp(f"sp_{request.param}")
    pieces = style["pieces"]  # in id order
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences(random.Random(1), 400)),
        model_prefix=str(path / "tokenizer"),
        vocab_size=320,
        model_type="bpe",
        byte_fallback=True,
        control_symbols=SP_SPECIALS,
        **{f"{k}_id": i for i, k in enumerate(pieces)},
        **{f"{k}_piece": v for k, v in pieces.items()},
        add_dummy_prefix=style["add_dummy_prefix"],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        minloglevel=2,
    )
    os.remove(path / "tokenizer.vocab")
    added = {
        str(i): {"content": c, "special": True, "lstrip": False, "rstrip": False,
                 "normalized": False, "single_word": False}
        for i, c in enumerate([*pieces.values(), *SP_SPECIALS])
    }  # fmt: skip
    config = {
        "tokenizer_class": style["hf_class"],
        **{f"{k}_token": v for k, v in pieces.items()},
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "chat_template": tokenizer.BUILTIN_TEMPLATES["gemma"],
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def hf_bpe(bpe_dir):
    return transformers.AutoTokenizer.from_pretrained(bpe_dir)


@pytest.fixture(scope="module")
def hf_sp(sp_dir):
    config = json.loads(open(os.path.join(sp_dir, "tokenizer_config.json")).read())
    return getattr(transformers, config["tokenizer_class"]).from_pretrained(sp_dir)


def test_bpe_encode_decode_match_transformers(bpe_dir, hf_bpe, rng):
    tok = tokenizer.load(bpe_dir)
    raw = tokenizers.Tokenizer.from_file(os.path.join(bpe_dir, "tokenizer.json"))
    for _ in range(40):
        text = _random_text(rng, BPE_SPECIALS)
        ids = tok.encode(text, add_bos=None)
        assert ids == hf_bpe.encode(text), text  # BOS from the post-processor, by default
        assert tok.encode(text) == raw.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_bos=False, add_eos=True)[-1] == tok.eos_id
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_bpe.decode(
                ids, skip_special_tokens=skip
            )
        assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_bpe_special_tokens(bpe_dir, hf_bpe):
    tok = tokenizer.load(os.path.join(bpe_dir, "tokenizer.json"))  # a file path works too
    assert tok.bos_id == hf_bpe.bos_token_id and tok.add_bos_default
    assert tok.eos_id == hf_bpe.eos_token_id
    # generation_config.json adds <|endoftext|> as a second stop token, after the tokenizer's EOS
    assert tok.eos_ids == (hf_bpe.eos_token_id, hf_bpe.convert_tokens_to_ids("<|endoftext|>"))
    assert tok.pad_id == hf_bpe.pad_token_id
    assert tok.vocab_size == len(hf_bpe)
    assert tok.chat_template == CHATML_TAGGED  # read back from chat_template.jinja


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_bpe_chat_template_and_mask_match_transformers(bpe_dir, hf_bpe, rng, add_generation_prompt):
    tok = tokenizer.load(bpe_dir)
    for _ in range(6):
        messages = _conversation(rng, end_with_assistant=not add_generation_prompt)
        kw = dict(add_generation_prompt=add_generation_prompt)
        text = tok.apply_chat_template(messages, **kw)
        assert text == hf_bpe.apply_chat_template(messages, tokenize=False, **kw)
        ref = hf_bpe.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kw
        )
        assert tok.apply_chat_template(messages, tokenize=True, **kw) == ref["input_ids"]
        ids, mask = tok.encode_chat(messages, **kw)
        assert ids == ref["input_ids"]
        assert mask == ref["assistant_masks"]
        # The mask holds exactly the replies and their end-of-turn tokens.
        replies = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == replies
        # Without {% generation %} tags the mask comes from incremental rendering: same mask.
        plain = tok.encode_chat(messages, chat_template=CHATML_PLAIN, **kw)
        assert plain == (ids, mask)


def test_sentencepiece_matches_sentencepiece(sp_dir, rng):
    tok = tokenizer.load(os.path.join(sp_dir, "tokenizer.model"))
    sp = spm.SentencePieceProcessor(model_file=os.path.join(sp_dir, "tokenizer.model"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (sp.bos_id(), sp.eos_id(), sp.pad_id())
    assert tok.vocab_size == sp.get_piece_size()
    for _ in range(40):
        # Without special-token strings the text goes through SentencePiece in one piece.
        text = _random_text(rng, specials=["x"])
        ids = tok.encode(text, add_bos=True)
        assert ids == sp.encode(text, add_bos=True), text
        assert tok.encode(text, add_bos=False) == sp.encode(text)
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids)
        assert tok.decode(ids[1:]) == text


def test_sentencepiece_matches_transformers(sp_dir, hf_sp, rng):
    tok = tokenizer.load(sp_dir)
    specials = [tok.bos_token, tok.eos_token, tok.pad_token, "<unk>", *SP_SPECIALS]
    # transformers' Llama tokenizer drops SentencePiece's extra dummy prefix before leading
    # whitespace (where it departs from sentencepiece), so texts start with a non-space there.
    lead_space = type(hf_sp).__name__ == "GemmaTokenizer"  # Gemma has no dummy prefix
    for _ in range(40):
        text = _random_text(rng, specials, lead_space=lead_space)
        ids = tok.encode(text, add_bos=None)
        assert ids == hf_sp.encode(text), text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_sp.decode(
                ids, skip_special_tokens=skip
            )


@pytest.mark.parametrize("sp_dir", ["llama"], indirect=True)
def test_sentencepiece_legacy_flag_matches_transformers(sp_dir, rng, tmp_path):
    """tokenizer_config.json's "legacy": true (older Llama / Mistral checkpoints) puts the
    dummy-prefix space before text after a special token too, as SentencePiece puts it at the
    start; transformers reads the flag, so do we. (After a special token, as at the start,
    transformers 5 adds no prefix to text that begins with a space, where SentencePiece, and
    we, do: the texts here have none there.)"""
    shutil.copytree(sp_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": True}))
    tok, hf = tokenizer.load(tmp_path), transformers.LlamaTokenizer.from_pretrained(tmp_path)
    default = tokenizer.load(sp_dir)
    specials = [tok.bos_token, tok.eos_token, *SP_SPECIALS]
    after_special = re.compile("(" + "|".join(map(re.escape, specials)) + r")\s+")
    differ = 0
    for _ in range(40):
        text = after_special.sub(r"\1", _random_text(rng, specials, lead_space=False))
        ids = tok.encode(text, add_bos=None)
        assert ids == hf.encode(text), text
        differ += ids != default.encode(text, add_bos=None)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            )
    assert differ > 10  # the flag changes most texts that hold special tokens


# The pipeline of hub Llama 2 / Mistral tokenizer.json files (converted by older transformers):
# a dummy-prefix "▁" prepended by the normalizer, so also after every special token.
HUB_LLAMA_PIPELINE = {
    "normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ]},
    "pre_tokenizer": None,
    "decoder": {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ]},
}  # fmt: skip


@pytest.mark.parametrize("sp_dir", ["llama"], indirect=True)
@pytest.mark.parametrize("legacy", [False, True, None])
def test_hub_llama_tokenizer_json_follows_the_legacy_flag(sp_dir, rng, tmp_path, legacy):
    """A Llama tokenizer.json with the hub's older pipeline: transformers 5 rebuilds it from the
    class (LlamaTokenizer) and the "legacy" flag, keeping only the vocabulary and merges; read
    as written it prepends "▁" after special tokens whatever the flag says."""
    transformers.LlamaTokenizer.from_pretrained(sp_dir).save_pretrained(tmp_path)
    os.remove(tmp_path / "tokenizer.model") if (tmp_path / "tokenizer.model").exists() else None
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps({**data, **HUB_LLAMA_PIPELINE}))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("legacy", None)
    config.pop("add_prefix_space", None)
    if legacy is not None:
        config["legacy"] = legacy
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok, hf = tokenizer.load(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    as_written = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    specials = [tok.bos_token, tok.eos_token, *SP_SPECIALS]
    differ = 0
    for _ in range(40):
        text = _random_text(rng, specials)
        ids = tok.encode(text, add_bos=None)
        assert ids == hf.encode(text), text
        differ += ids[1:] != as_written.encode(text, add_special_tokens=False).ids
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            )
    # The file's own pipeline gives other ids: after special tokens unless legacy, and before
    # leading whitespace (one "▁" where it prepends a second).
    assert differ > (0 if legacy else 10)
    probe = " hello" if legacy else f"{tok.eos_token}hello"
    assert tok.encode(probe, add_bos=False) != as_written.encode(probe).ids


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_sentencepiece_chat_and_mask_match_transformers(sp_dir, hf_sp, rng, add_generation_prompt):
    tok = tokenizer.load(sp_dir)
    for _ in range(6):
        messages = _conversation(rng, end_with_assistant=not add_generation_prompt)
        kw = dict(add_generation_prompt=add_generation_prompt)
        assert tok.apply_chat_template(messages, **kw) == hf_sp.apply_chat_template(
            messages, tokenize=False, **kw
        )
        ref = hf_sp.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kw
        )
        ids, mask = tok.encode_chat(messages, **kw)
        assert ids == ref["input_ids"]
        assert mask == ref["assistant_masks"]
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1


def test_builtin_template_selected_by_name(bpe_dir, rng):
    messages = _conversation(rng, end_with_assistant=True)
    tok = tokenizer.load(bpe_dir, chat_template="chatml")
    text = tok.apply_chat_template(messages)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_end|>\n")
    assert text == tokenizer.load(bpe_dir).apply_chat_template(messages, chat_template="qwen")


def test_missing_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json .* nor tokenizer.model"):
        tokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tokenizer.load(tmp_path / "nowhere")


def test_corrupt_files(tmp_path, bpe_dir):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match="not a valid HF tokenizer.json"):
        tokenizer.load(tmp_path)
    bad_config = tmp_path / "cfg"
    bad_config.mkdir()
    shutil.copy(os.path.join(bpe_dir, "tokenizer.json"), bad_config / "tokenizer.json")
    (bad_config / "tokenizer_config.json").write_text("{'bos_token': 1}")
    with pytest.raises(ValueError, match="tokenizer_config.json: invalid JSON"):
        tokenizer.load(bad_config)
    (bad_config / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="eos_token '<\\|nope\\|>' is not in the vocabulary"):
        tokenizer.load(bad_config)


def test_bad_messages(bpe_dir, sp_dir):
    tok = tokenizer.load(bpe_dir)
    user = {"role": "user", "content": "hi"}
    with pytest.raises(ChatTemplateError, match="message 1 has unknown role 'robot'"):
        tok.apply_chat_template([user, {"role": "robot", "content": "beep"}])
    with pytest.raises(ChatTemplateError, match="message 0 .*'user'.* is missing 'content'"):
        tok.encode_chat([{"role": "user"}])
    with pytest.raises(ChatTemplateError, match="message 0 has no 'role'"):
        tok.apply_chat_template([{"content": "hi"}])
    with pytest.raises(ChatTemplateError, match="messages is empty"):
        tok.apply_chat_template([])
    with pytest.raises(ChatTemplateError, match="message 0 is a str"):
        tok.apply_chat_template(["hi"])
    # The Gemma template requires user/model alternation and says so.
    gemma = tokenizer.load(sp_dir)
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        gemma.encode_chat([user, user, {"role": "assistant", "content": "x"}])


def test_bad_templates(tmp_path, bpe_dir):
    raw = tokenizers.Tokenizer.from_file(os.path.join(bpe_dir, "tokenizer.json"))
    raw.save(str(tmp_path / "tokenizer.json"))
    bare = tokenizer.load(tmp_path)  # no config at all: no special tokens, no template
    assert bare.bos_id is None and bare.chat_template is None and not bare.add_bos_default
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(ChatTemplateError, match="has no chat template; pass chat_template="):
        bare.apply_chat_template(messages)
    with pytest.raises(ChatTemplateError, match="neither a built-in template name"):
        tokenizer.load(tmp_path, chat_template="vicuna")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        bare.apply_chat_template(messages, chat_template="{% for m in messages %}")
    # A template that rewrites the turns before a reply has no stable text to locate it by.
    unstable = (
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match="before it renders differently once it goes on"):
        bare.encode_chat(messages, chat_template=unstable)
    with pytest.raises(ChatTemplateError, match="rejected the conversation: no"):
        bare.apply_chat_template(messages, chat_template="{{ raise_exception('no') }}")


def test_pickle_round_trip(bpe_dir, sp_dir, rng):
    # Grain worker processes receive the tokenizer pickled.
    messages = _conversation(rng, end_with_assistant=True)
    for path in (bpe_dir, sp_dir):
        tok = tokenizer.load(path)
        copy = pickle.loads(pickle.dumps(tok))
        assert copy.encode_chat(messages) == tok.encode_chat(messages)
        assert copy.eos_ids == tok.eos_ids


def _added(content: str, special: bool = True) -> dict:
    return {"content": content, "special": special, "lstrip": False, "rstrip": False,
            "normalized": False, "single_word": False}  # fmt: skip


def test_sentencepiece_added_tokens_beyond_vocab(sp_dir, tmp_path, rng):
    # A SentencePiece model fine-tuned with ChatML tokens appended after its vocabulary.
    shutil.copy(os.path.join(sp_dir, "tokenizer.model"), tmp_path / "tokenizer.model")
    config = json.loads(open(os.path.join(sp_dir, "tokenizer_config.json")).read())
    n = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model")).get_piece_size()
    new = {n: _added("<|im_start|>"), n + 1: _added("<|im_end|>"), n + 2: _added("<x>", False)}
    config["added_tokens_decoder"].update({str(i): t for i, t in new.items()})
    config["eos_token"] = "<|im_end|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = tokenizer.load(tmp_path, chat_template="chatml")
    hf = getattr(transformers, config["tokenizer_class"]).from_pretrained(tmp_path)
    # (not len(hf): transformers' GemmaTokenizer appends a <mask> token of its own)
    assert (tok.vocab_size, tok.eos_id) == (n + 3, hf.eos_token_id)
    for _ in range(20):
        text = _random_text(rng, ["<|im_start|>", "<|im_end|>", "<x>"], lead_space=False)
        ids = tok.encode(text, add_bos=None)
        assert ids == hf.encode(text), text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            )
    messages = _conversation(rng, end_with_assistant=True)
    ids, mask = tok.encode_chat(messages)
    replies = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == replies


TOOL_USE = "TOOLS {% for t in tools or [] %}{{ t.name }}{% endfor %}: {{ messages[0].content }}"


def test_chat_template_files_are_found_as_transformers_finds_them(bpe_dir, tmp_path):
    """chat_template.jinja and additional_chat_templates/*.jinja over tokenizer_config.json's
    template, which is read before chat_template.json (the processor's file, that transformers'
    tokenizer never reads); each case against AutoTokenizer on the same files."""
    import transformers

    shutil.copy(os.path.join(bpe_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    chat = [{"role": "user", "content": "hi"}]
    config = {"eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}

    def both(**kwargs):
        ours = tokenizer.load(tmp_path).apply_chat_template(chat, **kwargs)
        hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
        return ours, hf.apply_chat_template(chat, tokenize=False, **kwargs)

    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "JSON"}))
    assert tokenizer.load(tmp_path).apply_chat_template(chat) == "JSON"  # nothing else
    config["chat_template"] = "CONFIG"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert both() == ("CONFIG", "CONFIG")
    (tmp_path / "chat_template.jinja").write_text("JINJA")
    (tmp_path / tokenizer.TEMPLATES_DIR).mkdir()
    (tmp_path / tokenizer.TEMPLATES_DIR / "tool_use.jinja").write_text(TOOL_USE)
    assert both() == ("JINJA", "JINJA")
    assert both(tools=[{"name": "f"}]) == ("TOOLS f: hi", "TOOLS f: hi")
    export = tmp_path / "export"
    export.mkdir()
    assert tokenizer.TEMPLATES_DIR in tokenizer.copy_files(tmp_path, export)
    assert tokenizer.load(export).chat_templates == tokenizer.load(tmp_path).chat_templates


def test_config_variants(bpe_dir, tmp_path):
    """AddedToken dicts, special_tokens_map.json, named chat templates, generation_config ids."""
    shutil.copy(os.path.join(bpe_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    config = {
        "bos_token": {"content": "<|begin|>", "special": True},
        "add_bos_token": False,
        "pad_token": "<pad>",  # not in the vocabulary: ignored, generation_config's id is used
        "chat_template": [
            {"name": "tool_use", "template": TOOL_USE},
            {"name": "default", "template": CHATML_PLAIN},
        ],
        "added_tokens_decoder": {"300": _added("<|new|>")},
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": 0, "pad_token_id": 2})
    )
    tok = tokenizer.load(tmp_path)
    raw = tokenizers.Tokenizer.from_file(os.path.join(bpe_dir, "tokenizer.json"))
    assert tok.bos_id == raw.token_to_id("<|begin|>") and not tok.add_bos_default
    assert tok.eos_ids == (raw.token_to_id("<|im_end|>"), 0)
    assert tok.pad_id == 2
    assert tok.chat_template == CHATML_PLAIN
    assert tok.vocab_size == 301 and tok.encode("a<|new|>")[-1] == 300
    # As transformers chooses: tools select "tool_use", a name selects that template.
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tools=[{"name": "f"}]) == "TOOLS f: hi"
    assert tok.apply_chat_template(chat, chat_template="tool_use") == "TOOLS : hi"
    assert tok.apply_chat_template(chat).endswith("<|im_start|>user\nhi<|im_end|>\n")
    config["chat_template"] = [{"name": "tool_use", "template": TOOL_USE}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"templates \['tool_use'\] and none named 'default'"):
        tokenizer.load(tmp_path).apply_chat_template(chat)
    config.update(chat_template=None, added_tokens_decoder={"305": _added("<|new|>")})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="added token '<\\|new\\|>' id 305, .* assigns it id 300"):
        tokenizer.load(tmp_path)
