"""A byte-level BPE tokenizer (Llama 3 style: BOS added by its post-processor) with a ChatML
template, trained here and saved by `transformers` (tokenizer.json + tokenizer_config.json): the
HF tokenizer of the tests that need one (no hub downloads)."""

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


def save(
    path,
    texts: list[str] | None = None,
    vocab_size: int = VOCAB,
    specials: list[str] = SPECIALS,
    pad_token: str = "<|pad|>",
    chat_template: str = CHATML,
):
    """Train the tokenizer (on `texts`, default the arithmetic task's rows), save its files into
    directory `path` (created if missing) and return the `tokenizers.Tokenizer`."""
    if texts is None:
        texts = [r["prompt"] + "\n" + r["completion"] for r in arithmetic.generate_split(0, 300)]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
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
        tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|im_end|>", pad_token=pad_token
    )
    hf.chat_template = chat_template
    hf.save_pretrained(path)
    return tok
