"""The tokenizer that generated models ship: byte-level BPE, and the default chat template.

`build_tokenizer()` makes the tokenizer that `make-model` writes into every generated model: the
256 byte tokens (id == byte value), merges learnt deterministically on a small built-in English
text, and the ChatML special tokens. Byte-level means any text, unicode included, round-trips
exactly, and HF `tokenizers` / transformers load the resulting tokenizer.json unchanged.
`CHATML_TEMPLATE` is also the template of a model directory that ships none.

The merges are learnt by a small pure-Python trainer (not `tokenizers`' BpeTrainer) so that the
vocabulary, and with it every generated model, depends only on this file, never on the version
of the tokenizers library.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)
"""Appended after the byte tokens and the merges, in this order."""

NUM_MERGES = 125
"""256 bytes + 125 merges + 3 special tokens = 384 ids."""

VOCAB_SIZE = 256 + NUM_MERGES + len(SPECIAL_TOKENS)

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Default chat template (ChatML, as Qwen models use) for models that ship none."""

# The text the merges are learnt on: plain English prose, so that common words and word pieces
# (" the", "ing", " of") become single tokens and prompts are a few times shorter than in bytes.
TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A language model reads a sequence of tokens and
predicts the next one. Each token is a piece of text: a whole word, part of a word, a space or a
single byte. When the model is served to many users at the same time, the server keeps the keys
and values of every request in a cache, so that each new token needs only one more step of work.
The attention part of every layer reads this cache, and its cost grows with the length of the
context. The feed forward part of every layer does not read the cache at all; it only needs the
hidden state of the token that is being decoded. This is why the two parts can run on different
machines: the attention workers keep the state, and the feed forward workers keep the weights.
In the morning the market was quiet. People walked along the river, and the light on the water
was bright and cold. A child asked her father why the sky is blue, and he said that the air
scatters blue light more than red light. She thought about it for a while and then asked where
the light goes at night. He laughed and told her that it goes to the other side of the world,
where it is morning for other children who are asking the same question.
There are many ways to write a good program. Start with a small piece that works, then test it,
then make it a little bigger. Read the error messages: they often tell you exactly what is wrong.
Name things after what they are. Keep functions short, and write down why the code does what it
does, not only what it does. When something is slow, measure it before you change it.
Once upon a time there was a little house at the edge of a forest. In the house lived an old
woman who baked bread every day. The smell of the bread went out through the open window and
into the trees, and the birds and the animals of the forest came to sit near the house and wait.
Every evening she put the bread that was left on the table outside, and every morning it was gone.
The history of numbers is the history of people counting things: sheep, days, stars and coins.
The first numbers were marks on bones and stones. Later came the digits one, two, three, four,
five, six, seven, eight, nine and, much later, zero. With zero and the place of each digit, people
could write any number with only ten signs, and they could add, subtract, multiply and divide.
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of ByteLevel pre-tokenization.

    Printable latin-1 bytes map to themselves; the rest map to chr(256 + n) in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    mapping: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _pre_tokenize(text: str) -> list[str]:
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return [piece for piece, _ in pre.pre_tokenize_str(text)]


def learn_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair).

    Deterministic for a given text. Stops early when no pair occurs twice.
    """
    words = Counter(_pre_tokenize(text))
    seqs = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, count in words.items():
            s = seqs[w]
            for pair in zip(s, s[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        merged = best[0] + best[1]
        for w, s in seqs.items():
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and s[i] == best[0] and s[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def build_tokenizer() -> Any:
    """The `tokenizers.Tokenizer` that every generated model ships (VOCAB_SIZE ids).

    ids 0..255 are the bytes 0..255, then the learnt merges, then SPECIAL_TOKENS. No normalizer
    and no post-processor: encoding adds no BOS/EOS, so ids are exactly the text's.
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    alphabet = bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    merges = learn_merges(TRAINING_TEXT, NUM_MERGES)
    if len(merges) != NUM_MERGES:
        raise RuntimeError(f"training text yields only {len(merges)} merges, need {NUM_MERGES}")
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"internal: tokenizer has {tok.get_vocab_size()} ids, not {VOCAB_SIZE}")
    return tok


def write_tokenizer_files(out: Path, *, model_max_length: int) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out`.

    Returns the special token ids (`endoftext`, `im_start`, `im_end`) for config.json.
    """
    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    ids = {
        "endoftext": tok.token_to_id(ENDOFTEXT),
        "im_start": tok.token_to_id(IM_START),
        "im_end": tok.token_to_id(IM_END),
    }
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHATML_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "additional_special_tokens": [IM_START, IM_END],
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return ids
