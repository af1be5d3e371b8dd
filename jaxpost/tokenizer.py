"""Tokenizers: SentencePiece models and HF `tokenizer.json`, special tokens, chat templates.

`load(path)` reads a local directory (or one tokenizer file) holding `tokenizer.json` (the
`tokenizers` library; preferred when both exist, as in `transformers`) or `tokenizer.model`
(SentencePiece), plus whichever of `tokenizer_config.json`, `special_tokens_map.json`,
`generation_config.json`, `chat_template.jinja`, `additional_chat_templates/`,
`chat_template.json` are present.

Text is tokenized the way `transformers` tokenizes it: special-token strings in the text (e.g. the
`<|im_start|>` a chat template writes) become their ids, and the rest goes through the model. For
SentencePiece, the text between special tokens is encoded span by span and only a span at the very
start of the string gets the model's dummy-prefix space, as in `transformers`' Llama and Gemma
tokenizers. One deliberate difference: text that starts with whitespace is encoded exactly as
SentencePiece encodes it ("▁" + "▁hello" for " hello"), where `transformers`' Llama tokenizer
drops the dummy prefix. `decode` never applies `clean_up_tokenization_spaces` (`transformers`
ignores it for BPE models too).

    tok = tokenizer.load("path/to/model")
    ids = tok.encode("Hello", add_bos=True)         # list[int]; no BOS unless asked
    ids, mask = tok.encode_chat(messages)           # mask: 1 on assistant reply tokens
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxpost import assistant_spans, chat_templates
from jaxpost.chat_templates import ChatTemplateError
from jaxpost.tokenizer_backends import Backend, HFBackend, Offsets, SentencePieceBackend
from jaxpost.tokenizer_files import (
    FILES,
    TEMPLATES_DIR,
    chat_templates_from_files,
    copy_files,
    find_files,
    id_list,
    read_json,
    token_str,
)

__all__ = [
    "Tokenizer",
    "load",
    "ChatTemplateError",
    "BUILTIN_TEMPLATES",
    "FILES",
    "TEMPLATES_DIR",
    "copy_files",
]

BUILTIN_TEMPLATES = chat_templates.BUILTIN_TEMPLATES


def _spans_to_mask(offsets: Offsets, spans: Iterable[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap a span (zero-width tokens: start inside it).

    A token straddling a span boundary counts as inside, as with `transformers`' char_to_token.
    """
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    s, e = bounds[:, 0], bounds[:, 1]
    mask = np.zeros(len(bounds), dtype=bool)
    for a, b in spans:
        mask |= ((s < b) & (e > a)) | ((s == e) & (s >= a) & (s < b))
    return mask.astype(int).tolist()


class Tokenizer:
    """A loaded tokenizer; see `load`. Ids are plain Python ints.

    Attributes:
      bos_id, eos_id: the BOS / primary EOS id, or None when the tokenizer has none.
      eos_ids: every id that ends generation: the tokenizer's EOS and generation_config.json's
        eos_token_id entries (e.g. Llama 3's <|eot_id|> and <|end_of_text|>), EOS first.
      pad_id: the pad token (tokenizer_config / special_tokens_map / the SentencePiece model's pad
        piece) if it is in the vocabulary, else generation_config's pad_token_id, else eos_id,
        else 0. Padding is always masked out, so the id only has to be a valid token.
      vocab_size: number of ids the tokenizer can produce (including added tokens); the model's
        embedding may be larger (padded).
      chat_template: jinja source of the default chat template, or None.
      chat_templates: every named template the files hold ({"default": ..., "tool_use": ...}),
        chosen as `transformers` does: `chat_template=<name>` picks one, and a call with
        `tools` uses "tool_use" when there is one.
      add_bos_default: whether the model expects BOS before raw text: `add_bos_token` in
        tokenizer_config.json, else whether tokenizer.json's post-processor adds BOS, else True
        for SentencePiece models (False when there is no BOS token).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        special_tokens: Mapping[str, str | None],
        extra_eos_ids: Sequence[int] = (),
        pad_id: int | None = None,
        add_bos_default: bool,
        chat_templates: Mapping[str, str],
        name: str,
    ):
        self._backend = backend
        self.name = name
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.pad_token = self.special_tokens.get("pad_token")
        self.bos_id = self._special_id("bos_token")
        self.eos_id = self._special_id("eos_token")
        if self.eos_id is None and extra_eos_ids:
            self.eos_id = int(extra_eos_ids[0])
        eos = [self.eos_id] if self.eos_id is not None else []
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys([*eos, *map(int, extra_eos_ids)]))
        # A pad token missing from the vocabulary (transformers would append it, growing the
        # vocabulary past the model's embedding) is ignored: any valid id pads equally well.
        pad = self._backend.token_to_id(self.pad_token) if self.pad_token is not None else None
        self.pad_id: int = next(i for i in (pad, pad_id, self.eos_id, 0) if i is not None)
        self.vocab_size: int = backend.vocab_size
        self.add_bos_default = bool(add_bos_default and self.bos_id is not None)
        self.chat_templates: dict[str, str] = dict(chat_templates)

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    def _special_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        if token is None:
            return None
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.name}: {key} {token!r} is not in the vocabulary")
        return token_id

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={self.eos_ids}, pad_id={self.pad_id})"
        )

    def encode(self, text: str, add_bos: bool | None = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text` ([T]); special-token strings in the text become their ids.

        add_bos: prepend BOS. Off by default, so pieces of a sequence can be encoded separately;
          None follows the tokenizer's own default (`add_bos_default`), which is what
          `transformers`' `encode(text)` does.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids, _ = self._backend.encode(text)
        if self.add_bos_default if add_bos is None else add_bos:
            if self.bos_id is None:
                raise ValueError(f"{self.name}: add_bos=True but the tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        if add_eos:
            if self.eos_id is None:
                raise ValueError(f"{self.name}: add_eos=True but the tokenizer has no EOS token")
            ids = [*ids, self.eos_id]
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        """(ids, [(start, end) character span of each token]) of `text`, without BOS/EOS."""
        return self._backend.encode(text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (any iterable of ints, e.g. a NumPy row)."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def _template(self, chat_template: str | None, tools: Any) -> str:
        named = self.chat_templates
        if chat_template is not None:
            if chat_template in named:
                return named[chat_template]
            return chat_templates.resolve_template(chat_template)
        if tools is not None and "tool_use" in named:
            return named["tool_use"]
        if "default" in named:
            return named["default"]
        if named:
            raise ChatTemplateError(
                f"{self.name} has chat templates {sorted(named)} and none named 'default'; "
                "pass chat_template= one of those names"
            )
        raise ChatTemplateError(
            f"{self.name} has no chat template; pass chat_template= one of "
            f"{sorted(BUILTIN_TEMPLATES)} or jinja source to load() or to this call"
        )

    def _render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool,
        chat_template: str | None,
        template_kwargs: Mapping[str, Any],
        with_spans: bool,
    ) -> tuple[str, list[tuple[int, int]]]:
        source = self._template(chat_template, template_kwargs.get("tools"))
        messages = chat_templates.validate_messages(messages)
        variables = {**self.special_tokens, **template_kwargs}
        if with_spans and not chat_templates.has_generation_tags(source):
            return assistant_spans.by_prefix(source, messages, add_generation_prompt, variables)
        return chat_templates.render(source, messages, add_generation_prompt, variables)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Renders a conversation with the chat template; ids ([T]) instead when `tokenize`.

        messages: dicts with 'role' (one of chat_templates.KNOWN_ROLES) and 'content'.
        chat_template: overrides the tokenizer's template: the name of one of its templates
          (`chat_templates`), a built-in name or jinja source.
        template_kwargs: extra template variables (tools=..., enable_thinking=...).
        The template writes BOS itself when the model wants it, so none is added here.
        """
        text, _ = self._render(
            messages, add_generation_prompt, chat_template, template_kwargs, with_spans=False
        )
        return self._backend.encode(text)[0] if tokenize else text

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> tuple[list[int], list[int]]:
        """(ids [T], assistant_mask [T]) of a conversation, for completion-only losses.

        The mask is 1 exactly on the tokens of assistant replies: the reply text and the
        end-of-turn token the template closes it with (`<|eot_id|>`, `<|im_end|>`,
        `<end_of_turn>`), since the model must learn to emit it. It is 0 on the role header and
        generation prompt (`<|im_start|>assistant\\n`), on the newline after the end-of-turn
        token, and on all other messages. Spans come from the template's `{% generation %}`
        blocks when it has them (the TRL / `transformers` convention, giving the same mask as
        `apply_chat_template(..., return_assistant_tokens_mask=True)`), otherwise from rendering
        the conversation incrementally (see `assistant_spans.by_prefix`; a turn
        that a template writes differently once the conversation goes on, such as Qwen3's, is
        found in the whole conversation's text, which is the text trained). A token
        that straddles a span boundary is in the mask.
        """
        text, spans = self._render(
            messages, add_generation_prompt, chat_template, template_kwargs, with_spans=True
        )
        ids, offsets = self._backend.encode(text)
        return ids, _spans_to_mask(offsets, spans)


# tokenizer_config.json classes whose tokenizer.json pipeline transformers 5 rebuilds as Llama's
# (`HFBackend.use_llama_pipeline`); other classes' files are read as they are.
LLAMA_TOKENIZER_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")


def load(path: str | Path, chat_template: str | None = None) -> Tokenizer:
    """Loads a tokenizer from a local directory, or from a tokenizer.json / *.model file.

    chat_template: a built-in template name (`BUILTIN_TEMPLATES`: llama3, chatml / qwen, gemma) or
      jinja source, replacing whatever template the files hold (use it for tokenizers without one).
    Special tokens come from tokenizer_config.json, then special_tokens_map.json, then (for
    SentencePiece) the model's own BOS/EOS/pad pieces; generation_config.json adds EOS ids.
    """
    directory, file = find_files(Path(path))
    config = read_json(directory / "tokenizer_config.json")
    token_map = read_json(directory / "special_tokens_map.json")
    generation = read_json(directory / "generation_config.json")

    added: dict[int, tuple[str, bool]] = {}
    for key, entry in config.get("added_tokens_decoder", {}).items():
        content = token_str(entry)
        if content is not None:
            added[int(key)] = (content, bool(entry.get("special", True)))

    is_json = file.suffix == ".json"
    backend: HFBackend | SentencePieceBackend
    # transformers' Llama tokenizer: legacy=True puts SentencePiece's dummy-prefix space before
    # text that follows a special token too (its default, absent the key, is False).
    legacy = bool(config.get("legacy", False))
    if is_json:
        backend = HFBackend(file, added)
        if config.get("tokenizer_class") in LLAMA_TOKENIZER_CLASSES:
            add_prefix_space = config.get("add_prefix_space")
            backend.use_llama_pipeline(legacy, add_prefix_space is None or bool(add_prefix_space))
    else:
        backend = SentencePieceBackend(file, added, legacy=legacy)

    special: dict[str, str | None] = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        special[key] = token_str(config.get(key)) or token_str(token_map.get(key))
    if isinstance(backend, SentencePieceBackend):
        sp = backend.sp
        for key, piece_id in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                              ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id())):  # fmt: skip
            if special[key] is None and piece_id >= 0:
                special[key] = sp.id_to_piece(piece_id)

    if "add_bos_token" in config:
        add_bos_default = bool(config["add_bos_token"])
    elif isinstance(backend, HFBackend):
        bos_id = backend.token_to_id(special["bos_token"]) if special["bos_token"] else None
        add_bos_default = bos_id is not None and backend.adds_bos(bos_id)
    else:
        add_bos_default = True  # SentencePiece LLMs (Llama 2, Gemma) are trained with BOS

    templates = (
        {"default": chat_templates.resolve_template(chat_template)}
        if chat_template is not None
        else chat_templates_from_files(directory, config)
    )
    pad_ids = id_list(generation.get("pad_token_id"))
    return Tokenizer(
        backend,
        special_tokens=special,
        extra_eos_ids=id_list(generation.get("eos_token_id")),
        pad_id=pad_ids[0] if pad_ids else None,
        add_bos_default=add_bos_default,
        chat_templates=templates,
        name=str(path),
    )
