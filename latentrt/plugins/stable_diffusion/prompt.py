"""A1111's prompt syntax: attention weights, ``BREAK`` and 75-token chunks.

Weights (A1111 ``modules/prompt_parser.py``, ``parse_prompt_attention``): ``(text)``
multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.3)`` sets
the multiplier; brackets nest by multiplying. ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are
literal characters. An unclosed ``(`` or ``[`` applies to the rest of the prompt; a stray
``)`` or ``]`` (or ``:1.3)`` with no open bracket) is literal text. ``BREAK`` (a whole word,
upper case) ends the current chunk.

Chunks (A1111 ``modules/sd_hijack_clip.py``, ``tokenize_line``): each weighted piece is
tokenized on its own; tokens fill chunks of 75, each wrapped as ``BOS + 75 + EOS`` = 77 ids
with padding after the end token. When a chunk is full and the last comma is at most
``comma_padding_backtrack`` (20) tokens back, the tokens after that comma move to the next
chunk, so a phrase is not cut in half. The text encoder encodes each chunk separately and
concatenates the results along the token axis.

Deviations from A1111, both on input A1111 mishandles:

- ``BREAK`` inside brackets still breaks. A1111 multiplies its ``-1`` marker by the bracket
  weight, so ``(a BREAK b)`` gives the literal word "break" with weight -1.1 instead.
- A weight that is not a number (``(word:1.2.3)``) is an :class:`InvalidRequest` naming it;
  A1111 fails with a bare ``ValueError``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from latentrt.core.errors import InvalidRequest

__all__ = [
    "BREAK",
    "CHUNK_LENGTH",
    "COMMA_PADDING_BACKTRACK",
    "ChunkTokenizer",
    "PromptChunk",
    "empty_chunk",
    "pad_chunk_counts",
    "parse_prompt_attention",
    "tokenize_weighted",
]

CHUNK_LENGTH = 75  # prompt tokens per chunk; with BOS and EOS the text encoder sees 77
COMMA_PADDING_BACKTRACK = 20  # A1111's opts.comma_padding_backtrack default
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = ("BREAK", -1.0)  # how parse_prompt_attention reports a chunk break, as A1111 does

# One alternative per token kind, tried in order (A1111's re_attention): escaped brackets
# and backslash, a lone backslash (dropped), openers, ":weight)" closers, closers, plain
# text, and a lone ":" (plain text).
_ATTENTION = re.compile(
    r"""
    \\[()\[\]\\] | \\
    | \( | \[
    | :\s*([+-]?[.\d]+)\s*\)
    | \) | \]
    | [^\\()\[\]:]+ | :
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


class ChunkTokenizer(Protocol):
    """What chunking needs from a tokenizer (``CLIPTokenizer`` provides it)."""

    bos_id: int
    eos_id: int
    pad_id: int

    @property
    def comma_id(self) -> int:
        """The id of a word-final comma."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens."""
        ...


@dataclass(frozen=True)
class PromptChunk:
    """One text-encoder input: 77 token ids and the attention weight of each."""

    ids: list[int]
    weights: list[float]


@dataclass
class _Span:
    """A piece of prompt text with its weight, or a BREAK marker."""

    text: str
    weight: float
    is_break: bool = False


def _check_prompt(prompt: object) -> str:
    if not isinstance(prompt, str):
        raise InvalidRequest(f"a prompt must be a string, got {type(prompt).__name__}: {prompt!r:.80}")
    return prompt


def _multiply(spans: list[_Span], start: int, multiplier: float) -> None:
    """Multiply the weight of every span from ``start`` on; BREAK markers keep theirs."""
    for span in spans[start:]:
        if not span.is_break:
            span.weight *= multiplier


def _plain(text: str) -> list[_Span]:
    """Plain text at weight 1, with a BREAK marker wherever ``BREAK`` stands as a word."""
    spans: list[_Span] = []
    for i, part in enumerate(_BREAK.split(text)):
        if i > 0:
            spans.append(_Span(BREAK[0], BREAK[1], is_break=True))
        spans.append(_Span(part, 1.0))
    return spans


def _explicit_weight(number: str, token: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise InvalidRequest(f"prompt weight {number!r} in {token!r} is not a number; write e.g. (word:1.2)") from None


def _merge_equal_weights(spans: list[_Span]) -> list[_Span]:
    """Join neighbours with the same weight (never BREAK markers)."""
    merged = [spans[0]]
    for span in spans[1:]:
        last = merged[-1]
        if not (span.is_break or last.is_break) and span.weight == last.weight:
            last.text += span.text
        else:
            merged.append(span)
    return merged


def _parse(text: str) -> list[_Span]:
    """A1111's attention parse: a stack of open brackets; a closer multiplies the spans since its opener."""
    spans: list[_Span] = []
    round_starts: list[int] = []
    square_starts: list[int] = []
    for match in _ATTENTION.finditer(text):
        token, number = match.group(0), match.group(1)
        if token.startswith("\\"):
            spans.append(_Span(token[1:], 1.0))
        elif token == "(":
            round_starts.append(len(spans))
        elif token == "[":
            square_starts.append(len(spans))
        elif number is not None and round_starts:
            _multiply(spans, round_starts.pop(), _explicit_weight(number, token))
        elif token == ")" and round_starts:
            _multiply(spans, round_starts.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_starts:
            _multiply(spans, square_starts.pop(), SQUARE_MULTIPLIER)
        else:
            spans.extend(_plain(token))
    # Unclosed brackets reach to the end of the prompt, innermost last.
    for start in round_starts:
        _multiply(spans, start, ROUND_MULTIPLIER)
    for start in square_starts:
        _multiply(spans, start, SQUARE_MULTIPLIER)
    return _merge_equal_weights(spans or [_Span("", 1.0)])


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """``(text, weight)`` pieces of an A1111 prompt; a chunk break is ``("BREAK", -1.0)``.

    ``parse_prompt_attention("an (important) word")`` is
    ``[("an ", 1.0), ("important", 1.1), (" word", 1.0)]``.
    """
    return [(span.text, span.weight) for span in _parse(_check_prompt(text))]


class _ChunkBuilder:
    """Fills 75-token chunks the way A1111's ``tokenize_line`` does."""

    def __init__(self, tokenizer: ChunkTokenizer, chunk_length: int, backtrack: int) -> None:
        self.tokenizer = tokenizer
        self.chunk_length = chunk_length
        self.backtrack = backtrack
        self.comma_id = tokenizer.comma_id
        self.chunks: list[PromptChunk] = []
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.last_comma = -1

    def add(self, token: int, weight: float) -> None:
        """Append one token, first closing the chunk if it is full (at the last comma if near)."""
        if token == self.comma_id:
            self.last_comma = len(self.ids)
        elif len(self.ids) == self.chunk_length and self._near_comma():
            self._backtrack()
        if len(self.ids) == self.chunk_length:
            self.close()
        self.ids.append(token)
        self.weights.append(weight)

    def _near_comma(self) -> bool:
        return self.backtrack > 0 and self.last_comma >= 0 and len(self.ids) - self.last_comma <= self.backtrack

    def _backtrack(self) -> None:
        """Close the chunk after its last comma and carry the tokens after it to the next."""
        cut = self.last_comma + 1
        moved_ids, moved_weights = self.ids[cut:], self.weights[cut:]
        del self.ids[cut:], self.weights[cut:]
        self.close()
        self.ids, self.weights = moved_ids, moved_weights

    def close(self) -> None:
        """Wrap the current tokens as BOS + tokens + EOS + padding and start a new chunk."""
        padding = self.chunk_length - len(self.ids)
        tok = self.tokenizer
        ids = [tok.bos_id, *self.ids, tok.eos_id, *([tok.pad_id] * padding)]
        weights = [1.0, *self.weights, 1.0, *([1.0] * padding)]
        self.chunks.append(PromptChunk(ids, weights))
        self.ids, self.weights, self.last_comma = [], [], -1

    def finish(self) -> list[PromptChunk]:
        """All chunks; the last partial one is closed, and an empty prompt still gives one."""
        if self.ids or not self.chunks:
            self.close()
        return self.chunks


def tokenize_weighted(
    tokenizer: ChunkTokenizer,
    prompt: str,
    *,
    chunk_length: int = CHUNK_LENGTH,
    comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK,
) -> list[PromptChunk]:
    """An A1111 prompt as chunks of ``chunk_length + 2`` ids and weights (BOS/EOS/pad weigh 1).

    Each weighted piece is tokenized separately; ``BREAK`` closes the current chunk (so a
    leading ``BREAK`` yields an empty first chunk, as in A1111).
    """
    if chunk_length < 1 or comma_padding_backtrack < 0:
        raise InvalidRequest(
            f"chunk_length must be >= 1 and comma_padding_backtrack >= 0, "
            f"got {chunk_length} and {comma_padding_backtrack}"
        )
    builder = _ChunkBuilder(tokenizer, chunk_length, comma_padding_backtrack)
    for span in _parse(_check_prompt(prompt)):
        if span.is_break:
            builder.close()
            continue
        for token in tokenizer.encode(span.text):
            builder.add(token, span.weight)
    return builder.finish()


def empty_chunk(tokenizer: ChunkTokenizer, chunk_length: int = CHUNK_LENGTH) -> PromptChunk:
    """The chunk of an empty prompt: BOS, EOS, then padding, all at weight 1."""
    return _ChunkBuilder(tokenizer, chunk_length, 0).finish()[0]


def pad_chunk_counts(
    chunk_lists: Sequence[Sequence[PromptChunk]], tokenizer: ChunkTokenizer
) -> list[list[PromptChunk]]:
    """Pad every prompt's chunk list with empty chunks to the longest one's count.

    A1111 does this for a batch and for the prompt / negative-prompt pair, so their
    encodings have the same number of tokens and can run in one batched call.
    """
    if not chunk_lists:
        return []
    count = max(len(chunks) for chunks in chunk_lists)
    lengths = {len(chunk.ids) for chunks in chunk_lists for chunk in chunks}
    if len(lengths) > 1:
        raise InvalidRequest(f"chunks of different lengths {sorted(lengths)} cannot be batched")
    chunk_length = lengths.pop() - 2 if lengths else CHUNK_LENGTH
    return [
        [*chunks, *(empty_chunk(tokenizer, chunk_length) for _ in range(count - len(chunks)))] for chunks in chunk_lists
    ]
