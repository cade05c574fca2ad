"""The symbol set of the EDU anchor rule: tokens that must not become entropy anchors.

METHOD.md "Anchor rule": a position branches only if its top-1 token is not a plain symbol. A high-entropy
choice between ")" and "}" or between "\\(" and "$" is a formatting ambiguity, not a reasoning fork, so
branching there would spend leaves on duplicates of the same solution.

Decisions (kept in one place so they are easy to change):
- A token is a symbol when its decoded text, stripped of whitespace, is non-empty and every character is
  ASCII punctuation/operators (`string.punctuation`: braces, brackets, `$`, `\\`, `+-*/=<>^_|&%!?,.;:'"`~`,
  `#`, `@`), Unicode punctuation (category P*: "，", "—", curly quotes) or a Unicode math symbol
  (category Sm: "×", "≤").
  Hence `\\(`, `\\)`, `\\[`, `\\]`, `\\\\`, `$$`, `}{` are symbols.
- Whitespace-only tokens (" ", "\\n\\n", "\\t") are symbols: a fork between a blank line and a newline is
  layout, not content.
- Any letter or digit makes a token content, so `7`, `x`, ` the` are not symbols, and neither are LaTeX
  commands with letters (`\\frac`, `\\cdot`, `\\le`): they name the operation being written, which is exactly
  the kind of choice a reasoning fork is about, and a letters rule needs no LaTeX command list.
- U+FFFD (a byte fragment of a multi-byte character, e.g. half a Chinese character) is not a symbol.
- Tokens that decode to "" (e.g. SentencePiece control tokens) and embedding rows past the tokenizer's
  vocabulary are not symbols; EOS/markup tokens decode to text with letters, so they never are.
"""

from __future__ import annotations

import string
import unicodedata
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edu_prm_jax.tokenization import Tokenizer

_ASCII_SYMBOLS = frozenset(string.punctuation)


def is_symbol_char(ch: str, extra: frozenset[str] = frozenset()) -> bool:
    """Whether one (non-whitespace) character counts as a symbol character."""
    if ch in _ASCII_SYMBOLS or ch in extra:
        return True
    if ch == "\ufffd" or ch.isascii():
        return False
    category = unicodedata.category(ch)
    return category.startswith("P") or category == "Sm"


def is_symbol_text(text: str, extra: frozenset[str] = frozenset()) -> bool:
    """Whether a token's decoded text is a plain symbol (see the module docstring for the rules)."""
    if not text:
        return False
    core = "".join(text.split())
    if not core:
        return True  # whitespace-only
    return all(is_symbol_char(ch, extra) for ch in core)


def symbol_token_mask(tokenizer: Tokenizer, extra_symbols: str = "", disable: bool = False,
                      size: int | None = None) -> np.ndarray:
    """Boolean mask over token ids (length `size`, default the tokenizer's vocab size), True for symbols.

    `size` may exceed the tokenizer's vocabulary because model embeddings are padded (Qwen2.5: 151936 rows
    for 151665 tokens); the extra rows are False. `extra_symbols` adds characters to the symbol alphabet.
    `disable=True` gives the empty symbol set (every position may anchor).
    """
    texts = tokenizer.decoded_token_texts()
    n = len(texts)
    size = n if size is None else int(size)
    if size < n:
        raise ValueError(f"symbol mask size {size} is smaller than the tokenizer vocabulary ({n} ids)")
    mask = np.zeros(size, dtype=bool)
    if disable:
        return mask
    extra = frozenset(extra_symbols) - frozenset(string.whitespace)
    mask[:n] = [is_symbol_text(t, extra) for t in texts]
    return mask
