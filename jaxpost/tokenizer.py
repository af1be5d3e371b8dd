"""Tokenizers: SentencePiece models and HF `tokenizer.json`, special tokens, chat templates.

`load(path)` reads a local directory (or one tokenizer file) holding `tokenizer.json` (the
`tokenizers` library; preferred when both exist, as in `transformers`) or `tokenizer.model`
(SentencePiece), plus whichever of `tokenizer_config.json`, `special_tokens_map.json`,
`generation_config.json`, `chat_template.jinja`, `chat_template.json` are present.

Text is tokenized the way `transformers` tokenizes it: special-token strings in the text (e.g. the
`<|im_start|>` a chat template writes) become their ids, and the rest goes through the model. For
SentencePiece, the text between special tokens is encoded piece by piece and only text at the very
start of the string gets SentencePiece's dummy-prefix space (what `transformers`' Llama/Gemma
tokenizers do, and what SentencePiece itself does with user-defined symbols).

    tok = tokenizer.load("path/to/model")
    ids = tok.encode("Hello")                       # list[int], BOS added if the model wants one
    ids, mask = tok.encode_chat(messages)           # mask: 1 on assistant reply tokens
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jaxpost import chat_templates
from jaxpost.chat_templates import ChatTemplateError

__all__ = ["Tokenizer", "load", "ChatTemplateError", "BUILTIN_TEMPLATES"]

BUILTIN_TEMPLATES = chat_templates.BUILTIN_TEMPLATES

Offsets = list[tuple[int, int]]


class _Backend(Protocol):
    vocab_size: int
    special_ids: frozenset[int]

    def encode(self, text: str) -> tuple[list[int], Offsets]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, token_id: int) -> str | None: ...


class _HFBackend:
    """A `tokenizers.Tokenizer` from tokenizer.json; added tokens are matched by the library."""

    def __init__(self, file: Path, added: Mapping[int, tuple[str, bool]]):
        import tokenizers

        try:
            self.tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the library raises bare Exceptions on malformed files
            raise ValueError(f"{file}: not a valid HF tokenizer.json ({e})") from e
        # tokenizer_config.json may declare added tokens that tokenizer.json lacks (transformers
        # adds them when loading); add them so both see the same vocabulary.
        missing = [
            tokenizers.AddedToken(content, special=special, normalized=False)
            for _, (content, special) in sorted(added.items())
            if self.tok.token_to_id(content) is None
        ]
        if missing:
            self.tok.add_tokens(missing)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(
            i for i, t in self.tok.get_added_tokens_decoder().items() if t.special
        )

    def encode(self, text: str) -> tuple[list[int], Offsets]:
        enc = self.tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def adds_bos(self, bos_id: int) -> bool:
        """Whether the post-processor inserts BOS (Llama 3 style tokenizer.json)."""
        with_special = self.tok.encode("a", add_special_tokens=True).ids
        plain = self.tok.encode("a", add_special_tokens=False).ids
        return len(with_special) > len(plain) and with_special[0] == bos_id

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)


class _SentencePieceBackend:
    """A SentencePiece model, with special-token strings split off before encoding."""

    def __init__(self, file: Path, added: Mapping[int, tuple[str, bool]]):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromFile(str(file))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{file}: not a valid SentencePiece model ({e})") from e
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        # Text that follows a special token must not get the dummy-prefix space: encode (and decode)
        # it with a copy of the model whose normalizer does not add one.
        if proto.normalizer_spec.add_dummy_prefix:
            proto.normalizer_spec.add_dummy_prefix = False
            self.sp_inner = spm.SentencePieceProcessor()
            self.sp_inner.LoadFromSerializedProto(proto.SerializeToString())
        else:
            self.sp_inner = self.sp
        n = self.sp.get_piece_size()
        user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
        self.added = {i: content for i, (content, _) in added.items()}
        self.special_ids = frozenset(
            [i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)]
            + [i for i, (_, special) in added.items() if special]
        )
        # Strings matched in text before SentencePiece sees it: control and unknown pieces,
        # user-defined pieces, and tokens added by tokenizer_config.json.
        split_ids = set(self.special_ids) | {
            i for i in range(n) if proto.pieces[i].type == user_defined
        }
        self.split_tokens = {self.sp.id_to_piece(i): i for i in split_ids if i < n}
        self.split_tokens.update({content: i for i, content in self.added.items()})
        pattern = "|".join(re.escape(t) for t in sorted(self.split_tokens, key=len, reverse=True))
        self.split_re = re.compile(f"({pattern})") if pattern else None
        self.vocab_size = max([n, *(i + 1 for i in self.added)])

    def encode(self, text: str) -> tuple[list[int], Offsets]:
        ids: list[int] = []
        offsets: Offsets = []
        parts = self.split_re.split(text) if self.split_re else [text]
        start = 0
        # re.split with one capture group alternates text, special, text, special, ...
        for k, part in enumerate(parts):
            if k % 2 == 1:
                ids.append(self.split_tokens[part])
                offsets.append((start, start + len(part)))
            elif part:
                sp = self.sp if start == 0 else self.sp_inner
                enc = sp.encode(part, return_type="offset_mapping")
                ids.extend(enc["ids"])
                offsets.extend((start + a, start + b) for a, b in enc["offsets"])
            start += len(part)
        return ids, offsets

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        n = self.sp.get_piece_size()
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        out: list[str] = []
        run: list[int] = []

        def flush() -> None:
            if run:
                # Only a run at the very start lost a dummy-prefix space when it was encoded.
                sp = self.sp if not out else self.sp_inner
                out.append(sp.decode(run))
                run.clear()

        for i in ids:
            if i in self.special_ids or i >= n:
                flush()
                out.append(self.id_to_token(i) or "")
            else:
                run.append(i)
        flush()
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token in self.split_tokens:
            return self.split_tokens[token]
        i = self.sp.piece_to_id(token)
        # piece_to_id answers the unknown id for strings that are not pieces
        return None if self.sp.is_unknown(i) and self.sp.id_to_piece(i) != token else i

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self.added:
            return self.added[token_id]
        if 0 <= token_id < self.sp.get_piece_size():
            return self.sp.id_to_piece(token_id)
        return None


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_str(value: Any) -> str | None:
    """A special token from a config: a string, or an AddedToken dict with 'content'."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


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
        piece), else generation_config's pad_token_id, else eos_id, else 0. Padding is always
        masked out, so the id only has to be a valid token.
      vocab_size: number of ids the tokenizer can produce (including added tokens); the model's
        embedding may be larger (padded).
      chat_template: jinja source of the chat template, or None.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        special_tokens: Mapping[str, str | None],
        extra_eos_ids: Sequence[int] = (),
        pad_id: int | None = None,
        add_bos_default: bool,
        chat_template: str | None,
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
        pad = self._special_id("pad_token")
        self.pad_id: int = next(i for i in (pad, pad_id, self.eos_id, 0) if i is not None)
        self.vocab_size: int = backend.vocab_size
        self.add_bos_default = bool(add_bos_default and self.bos_id is not None)
        self.chat_template = chat_template

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

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
        """Token ids of `text` ([T]); special-token strings in the text become their ids.

        add_bos: prepend BOS; None means the tokenizer's default (`add_bos_token` in
          tokenizer_config.json, else whether tokenizer.json's post-processor adds BOS, else True
          for SentencePiece models), as `transformers`' `encode(text)` does.
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

    def _template(self, chat_template: str | None) -> str:
        if chat_template is not None:
            return chat_templates.resolve_template(chat_template)
        if self.chat_template is None:
            raise ChatTemplateError(
                f"{self.name} has no chat template; pass chat_template= one of "
                f"{sorted(BUILTIN_TEMPLATES)} or jinja source to load() or to this call"
            )
        return self.chat_template

    def _render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool,
        chat_template: str | None,
        template_kwargs: Mapping[str, Any],
        with_spans: bool,
    ) -> tuple[str, list[tuple[int, int]]]:
        source = self._template(chat_template)
        messages = chat_templates.validate_messages(messages)
        variables = {**self.special_tokens, **template_kwargs}
        if with_spans and not chat_templates.has_generation_tags(source):
            return chat_templates.assistant_spans_by_prefix(
                source, messages, add_generation_prompt, variables
            )
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
        chat_template: overrides the tokenizer's template: a built-in name or jinja source.
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
        the conversation incrementally (see `chat_templates.assistant_spans_by_prefix`). A token
        that straddles a span boundary is in the mask.
        """
        text, spans = self._render(
            messages, add_generation_prompt, chat_template, template_kwargs, with_spans=True
        )
        ids, offsets = self._backend.encode(text)
        return ids, _spans_to_mask(offsets, spans)


def _find_files(path: Path) -> tuple[Path, Path]:
    """(directory holding the configs, tokenizer file) for a directory or a tokenizer file."""
    if path.is_file():
        return path.parent, path
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    for name in ("tokenizer.json", "tokenizer.model"):
        if (path / name).is_file():
            return path, path / name
    found = sorted(p.name for p in path.iterdir())[:20]
    raise FileNotFoundError(
        f"{path} holds neither tokenizer.json (HF tokenizers) nor tokenizer.model "
        f"(SentencePiece); it contains {found}"
    )


def _chat_template_from_files(directory: Path, config: Mapping[str, Any]) -> str | None:
    # transformers >= 4.43 saves the template next to the config; older files keep it inline.
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(directory / "chat_template.json").get("chat_template")
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, list):
        # Several named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(
                f"{directory}: chat_template lists templates {sorted(map(str, named))} but none "
                "is named 'default'"
            )
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ValueError(
            f"{directory}: chat_template is a {type(template).__name__}; expected a jinja string"
        )
    return template


def load(path: str | Path, chat_template: str | None = None) -> Tokenizer:
    """Loads a tokenizer from a local directory, or from a tokenizer.json / *.model file.

    chat_template: a built-in template name (`BUILTIN_TEMPLATES`: llama3, chatml / qwen, gemma) or
      jinja source, replacing whatever template the files hold (use it for tokenizers without one).
    Special tokens come from tokenizer_config.json, then special_tokens_map.json, then (for
    SentencePiece) the model's own BOS/EOS/pad pieces; generation_config.json adds EOS ids.
    """
    directory, file = _find_files(Path(path))
    config = _read_json(directory / "tokenizer_config.json")
    token_map = _read_json(directory / "special_tokens_map.json")
    generation = _read_json(directory / "generation_config.json")

    added: dict[int, tuple[str, bool]] = {}
    for key, entry in config.get("added_tokens_decoder", {}).items():
        content = _token_str(entry)
        if content is not None:
            added[int(key)] = (content, bool(entry.get("special", True)))

    is_json = file.suffix == ".json"
    backend: _HFBackend | _SentencePieceBackend
    backend = _HFBackend(file, added) if is_json else _SentencePieceBackend(file, added)

    special: dict[str, str | None] = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        special[key] = _token_str(config.get(key)) or _token_str(token_map.get(key))
    if isinstance(backend, _SentencePieceBackend):
        sp = backend.sp
        for key, piece_id in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                              ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id())):  # fmt: skip
            if special[key] is None and piece_id >= 0:
                special[key] = sp.id_to_piece(piece_id)

    if "add_bos_token" in config:
        add_bos_default = bool(config["add_bos_token"])
    elif isinstance(backend, _HFBackend):
        bos_id = backend.token_to_id(special["bos_token"]) if special["bos_token"] else None
        add_bos_default = bos_id is not None and backend.adds_bos(bos_id)
    else:
        add_bos_default = True  # SentencePiece LLMs (Llama 2, Gemma) are trained with BOS

    template = (
        chat_templates.resolve_template(chat_template)
        if chat_template is not None
        else _chat_template_from_files(directory, config)
    )
    pad_ids = _id_list(generation.get("pad_token_id"))
    return Tokenizer(
        backend,
        special_tokens=special,
        extra_eos_ids=_id_list(generation.get("eos_token_id")),
        pad_id=pad_ids[0] if pad_ids else None,
        add_bos_default=add_bos_default,
        chat_template=template,
        name=str(path),
    )
