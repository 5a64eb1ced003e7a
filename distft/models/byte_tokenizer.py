"""A byte-level tokenizer that needs no download, for models built from scratch.

Built with the `tokenizers` library (a byte-level BPE with no merges: one token per byte),
wrapped as a transformers PreTrainedTokenizerFast, so `save_pretrained` writes a normal
tokenizer.json that plain `AutoTokenizer.from_pretrained` loads without distft.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    byte_to_char = pre_tokenizers.ByteLevel.alphabet()
    # Order the byte alphabet by byte value so ids are stable across versions.
    table = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[table[b]] = len(vocab)
    assert set(table.values()) == set(byte_to_char)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.model_max_length = 1 << 20
    return fast


def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2 byte-to-printable-character table that ByteLevel pre-tokenization uses.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}
