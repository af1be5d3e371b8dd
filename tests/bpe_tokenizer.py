"""A byte-level BPE tokenizer with a ChatML template, trained here on the arithmetic task and saved
by `transformers` (tokenizer.json + tokenizer_config.json): the HF tokenizer of the tests that
need one (no hub downloads)."""

from __future__ import annotations

import tokenizers
import transformers
from tokenizers import decoders, pre_tokenizers, processors, trainers

from jaxpost.data.tasks import arithmetic

CHATML = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|pad|>", "<|begin|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 320


def save(path) -> None:
    """Write the tokenizer's files into directory `path` (created if missing)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rows = arithmetic.generate_split(0, 300)
    tok.train_from_iterator([r["prompt"] + "\n" + r["completion"] for r in rows], trainer)
    bos = tok.token_to_id("<|begin|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin|> $A", pair="<|begin|> $A $B", special_tokens=[("<|begin|>", bos)]
            ),
        ]
    )
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|im_end|>", pad_token="<|pad|>"
    )
    hf.chat_template = CHATML
    hf.save_pretrained(path)
