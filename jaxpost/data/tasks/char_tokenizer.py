"""A character-level tokenizer with a built-in chat template, for the built-in tasks.

It has the same duck type as `jaxpost.tokenizer` objects (`encode`, `decode`, `bos_id`,
`eos_id`, `pad_id`, `vocab_size`, `apply_chat_template`, `encode_chat`), so the data pipeline,
the trainer and the evaluator treat it like a real tokenizer. Special tokens are single ids
written as `<name>` in text; every other character is one id.

Chat template (one line per turn, no separators, so the model sees very short sequences):
    <bos><user>347+85<eos><assistant>7+5=12 ...<eos>
`add_generation_prompt=True` ends the text with `<assistant>`. Only assistant content and the
`<eos>` that closes it are marked as trained in `encode_chat`'s mask.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

SPECIALS = ("<pad>", "<bos>", "<eos>", "<system>", "<user>", "<assistant>")
ROLES = ("system", "user", "assistant")


class CharTokenizer:
    """One id per character of `alphabet`, after the special tokens (pad = 0)."""

    def __init__(self, alphabet: str):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet {alphabet!r} has repeated characters")
        if "<" in alphabet:
            raise ValueError("alphabet must not contain '<' (it starts special tokens)")
        self.alphabet = alphabet
        self._itos = list(SPECIALS) + list(alphabet)
        self._stoi = {s: i for i, s in enumerate(self._itos)}
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")
        self.pad_id = self._stoi["<pad>"]
        self.bos_id = self._stoi["<bos>"]
        self.eos_id = self._stoi["<eos>"]
        self.add_bos_default = True  # raw-text formats start with <bos>, like the chat template

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def token_id(self, token: str) -> int:
        return self._stoi[token]

    def encode(self, text: str) -> list[int]:
        """Text -> ids; `<bos>`-style special tokens written in the text become their ids."""
        ids = []
        for piece in self._special_re.split(text):
            if piece in self._stoi and piece in SPECIALS:
                ids.append(self._stoi[piece])
                continue
            for ch in piece:
                if ch not in self._stoi:
                    raise ValueError(
                        f"character {ch!r} is not in the tokenizer's alphabet {self.alphabet!r}"
                    )
                ids.append(self._stoi[ch])
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text; special tokens are written as `<name>` unless skipped."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._itos):
                raise ValueError(f"token id {i} is outside the vocabulary [0, {len(self._itos)})")
            if skip_special_tokens and i < len(SPECIALS):
                continue
            out.append(self._itos[i])
        return "".join(out)

    def _turns(self, messages: Sequence[Mapping[str, str]]):
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise ValueError(f"message {i}: role {role!r} is not one of {ROLES}")
            if not isinstance(content, str):
                raise ValueError(f"message {i}: content must be a string, got {type(content)}")
            yield role, content

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
    ) -> str | list[int]:
        """The conversation as text, or as ids (`tokenize`), as `jaxpost.tokenizer`'s."""
        if tokenize:
            return self.encode_chat(messages, add_generation_prompt)[0]
        text = "<bos>" + "".join(f"<{r}>{c}<eos>" for r, c in self._turns(messages))
        return text + ("<assistant>" if add_generation_prompt else "")

    def encode_chat(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """-> (ids, assistant_mask): mask is 1 on assistant content and its closing `<eos>`."""
        ids, mask = [self.bos_id], [0]
        for role, content in self._turns(messages):
            ids.append(self._stoi[f"<{role}>"])
            mask.append(0)
            body = self.encode(content) + [self.eos_id]
            ids += body
            mask += [int(role == "assistant")] * len(body)
        if add_generation_prompt:
            ids.append(self._stoi["<assistant>"])
            mask.append(0)
        return ids, mask
