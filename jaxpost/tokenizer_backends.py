"""Tokenizer backends: a `tokenizers.Tokenizer` (tokenizer.json) and a SentencePiece model.

Both encode text with special-token strings matched first and return character offsets per token
(which the assistant mask needs), and decode with or without special tokens. `jaxpost.tokenizer`
wraps them with special-token ids, BOS handling and chat templates.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

Offsets = list[tuple[int, int]]


class Backend(Protocol):
    vocab_size: int
    special_ids: frozenset[int]

    def encode(self, text: str) -> tuple[list[int], Offsets]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, token_id: int) -> str | None: ...


class HFBackend:
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
        for token_id, (content, _) in added.items():
            if self.tok.token_to_id(content) != token_id:
                raise ValueError(
                    f"{file}: tokenizer_config.json gives added token {content!r} id {token_id}, "
                    f"but the tokenizer assigns it id {self.tok.token_to_id(content)}"
                )
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(
            i for i, t in self.tok.get_added_tokens_decoder().items() if t.special
        )

    def use_llama_pipeline(self, legacy: bool, add_prefix_space: bool) -> None:
        """Replace tokenizer.json's normalizer, pre-tokenizer and decoder with the ones
        transformers 5's LlamaTokenizer builds (it keeps only the file's vocabulary, merges and
        post-processor): spaces become "▁" and one "▁" is prepended (Metaspace), to the whole
        text only (legacy=False) or also to text after a special token (legacy=True).

        Hub Llama 2 / Mistral files hold the older pipeline (a Prepend("▁") normalizer), which
        always prepends, even after a special token: read as they are they would give other ids
        than transformers and than the same model's tokenizer.model with "legacy": false.
        """
        from tokenizers import decoders, pre_tokenizers

        scheme = ("always" if legacy else "first") if add_prefix_space else "never"
        self.tok.normalizer = None
        self.tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme=scheme, split=False
        )
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix_space:
            steps.append(decoders.Strip(content=" ", left=1))
        self.tok.decoder = decoders.Sequence(steps)

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


class SentencePieceBackend:
    """A SentencePiece model, with special-token strings split off before encoding.

    legacy (tokenizer_config.json's key, as transformers' Llama tokenizer reads it): text after
    a special token gets the dummy-prefix space as text at the start does; by default it does
    not. Decoding keeps such a space either way, as transformers does."""

    def __init__(self, file: Path, added: Mapping[int, tuple[str, bool]], legacy: bool = False):
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
        self.legacy = legacy
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
                sp = self.sp if start == 0 or self.legacy else self.sp_inner
                piece_ids, piece_offsets = _encode_span(sp, part)
                ids.extend(piece_ids)
                offsets.extend((start + a, start + b) for a, b in piece_offsets)
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


def _encode_span(sp: Any, text: str) -> tuple[list[int], Offsets]:
    """SentencePiece ids of `text` with character offsets (the proto holds UTF-8 byte offsets).

    Uses the serialized SentencePieceText, which every sentencepiece 0.2.x returns.
    """
    from sentencepiece import sentencepiece_pb2

    proto = sentencepiece_pb2.SentencePieceText.FromString(
        sp.encode(text, out_type="serialized_proto")
    )
    # char_start[c] = byte offset where character c starts; searchsorted maps bytes back to chars
    # (SentencePiece only cuts inside a character for byte-fallback pieces, which it gives
    # zero-width or whole-character spans).
    char_start = np.cumsum([0, *(len(ch.encode("utf-8")) for ch in text)])
    ids = [p.id for p in proto.pieces]
    bounds = np.array([(p.begin, p.end) for p in proto.pieces], dtype=np.int64).reshape(-1, 2)
    chars = np.searchsorted(char_start, bounds, side="left")
    return ids, [(int(a), int(b)) for a, b in chars]
