"""The toy word-level tokenizer: the words of the toy grammar, lower-cased, plus Qwen's chat special tokens.

Word-level rather than :func:`harmon.testing.tiny_tokenizer`'s characters: a prompt such as "a red 3 on the left
and a blue 7 on the right" is 14 tokens instead of ~50, which keeps the tiny LLM's sequences (prompt + 64 image
tokens + buffer) short on a CPU. Unknown words map to ``<|endoftext|>`` (as the tiny tokenizer does).
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from harmon.testing import QWEN_CHAT_TEMPLATE, SPECIAL_TOKENS
from harmon.toy.data import COLOURS, COUNT_WORDS, NONE_ANSWER, SIDES

WORDS = (
    "system", "user", "assistant",  # chat roles
    "generate", "an", "image", "this", "describe", "the", "a", "on", "and", "is", "are", "there",
    "what", "digit", "digits", "colour", "how", "many", "where", "in",
    *SIDES, *COLOURS, *COUNT_WORDS.values(), NONE_ANSWER,
    *(str(d) for d in range(10)),
    ".", ":", "?", ",",
)
VOCAB_SIZE = 64  # the toy LLM's embedding rows (≥ len(SPECIAL_TOKENS) + len(WORDS))


def toy_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with ``<|endoftext|>`` = 0, ``<|im_start|>`` = 1, ``<|im_end|>`` = 2, ``<image>`` = 3
    and Qwen's chat template."""
    tokens = [*SPECIAL_TOKENS, *dict.fromkeys(WORDS)]
    if len(tokens) > VOCAB_SIZE:
        raise ValueError(f"the toy vocabulary has {len(tokens)} tokens, more than VOCAB_SIZE {VOCAB_SIZE}")
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<|endoftext|>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs; newlines are separators
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer
