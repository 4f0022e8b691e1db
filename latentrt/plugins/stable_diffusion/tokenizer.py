"""CLIP's byte-level BPE tokenizer (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision"), our implementation.

The pipeline, for one prompt (ids match transformers' ``CLIPTokenizer``):

1. special tokens (``<|startoftext|>``, ``<|endoftext|>``) written verbatim in the text are
   split out first and map straight to their ids, as transformers' added tokens do;
2. every other segment is cleaned (:func:`clean_text`): HTML entities unescaped twice (CLIP's
   ``basic_clean``), Unicode NFC, whitespace runs collapsed to one space, lowercased;
3. it is cut into words by CLIP's pattern (:func:`pretokenize`)
   ``'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``;
4. each word's UTF-8 bytes are mapped to printable characters (:func:`bytes_to_unicode`,
   GPT-2's table), ``</w>`` is appended to its last symbol, and BPE merges the adjacent pair
   of lowest rank until none is left (Sennrich et al. 2016; CLIP's ``bpe``).

Two sources for the vocabulary: the original ``bpe_simple_vocab_16e6.txt.gz`` shipped as
package data (MIT, see ``data/LICENSE-CLIP-BPE.txt``), from which the 49408-entry vocabulary
is derived exactly as CLIP derives it, or a diffusers folder's ``tokenizer/vocab.json`` +
``merges.txt``, which take precedence when present.

Differences from the references, all on rare input (documented, tested where possible):

- ftfy is not a dependency. Like transformers without ftfy we do not fix mojibake, curly
  quotes, ligatures or full-width forms (``don't`` written with U+2019 keeps that quote);
  Unicode NFC, the last step of ftfy's ``fix_text``, is applied.
- HTML entities are unescaped as CLIP does (``&amp;`` -> ``&``); transformers' fast
  tokenizer keeps them verbatim.
- Lowercasing is per character, as transformers' normalizer does: a word-final capital
  sigma becomes U+03C3 (Python's ``str.lower``, used by CLIP, gives final sigma U+03C2).
- Special tokens are recognised only as written (transformers); CLIP would also map
  ``<|ENDOFTEXT|>`` to the end token because it lowercases first.
- Contractions are matched case-sensitively after lowercasing (transformers); CLIP's
  ``re.IGNORECASE`` also reads an apostrophe + long s (U+017F) as ``'s``.
- ``\\p{L}`` / ``\\p{N}`` come from the running Python's ``unicodedata`` (Unicode 14.0 on
  Python 3.11): characters assigned in later Unicode versions count as symbols, so a word
  mixing them with letters splits where the ``regex`` module would not. ``\\s`` is Unicode's
  White_Space property (``\\x1c``-``\\x1f`` are not spaces), as in the reference engines.
"""

from __future__ import annotations

import functools
import gzip
import html
import itertools
import re
import sys
import unicodedata
import zlib
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path

from latentrt.core.checkpoint import read_json
from latentrt.core.errors import CheckpointError, InvalidRequest

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "CLIPTokenizer",
    "bytes_to_unicode",
    "clean_text",
    "pretokenize",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
PACKAGE_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges of the file (simple_tokenizer.py): a
# vocabulary of 256 bytes x 2 (with and without </w>) + 48894 merges + 2 specials = 49408.
CLIP_MERGE_COUNT = 49152 - 256 - 2
BPE_CACHE_SIZE = 65536
_NOT_A_MERGE = sys.maxsize

# Unicode's White_Space property: what ``\s`` means in the ``regex`` module and in the
# tokenizers library. Python's ``\s`` would also match \x1c-\x1f, which CLIP keeps.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE_RUN = re.compile(f"[{_WHITESPACE}]+")
_SPECIAL_TOKENS = re.compile(f"({re.escape(BOS_TOKEN)}|{re.escape(EOS_TOKEN)})")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, as CLIP uses it.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...)
    map to U+0100 onwards in byte order, so no BPE symbol is whitespace or a control.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def clean_text(text: str) -> str:
    """CLIP's text cleanup without ftfy: unescape HTML twice, NFC, collapse spaces, lowercase."""
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text)
    text = _WHITESPACE_RUN.sub(" ", text).strip(" ")
    # Per character, like the tokenizers library's Lowercase (no final-sigma rule).
    return "".join(char.lower() for char in text)


def _major_categories() -> str:
    """The first letter of every code point's general category, as one string indexed by code point."""
    categories = map(unicodedata.category, map(chr, range(sys.maxunicode + 1)))
    return "".join(category[0] for category in categories)


def _char_class(majors: str, major: str) -> str:
    r"""A ``re`` character-class body for ``\p{<major>}`` (``L`` letters, ``N`` numbers)."""
    runs = re.finditer(f"{major}+", majors)
    spans = ((run.start(), run.end() - 1) for run in runs)
    return "".join(rf"\U{lo:08x}" if lo == hi else rf"\U{lo:08x}-\U{hi:08x}" for lo, hi in spans)


@functools.cache
def _word_pattern() -> re.Pattern[str]:
    r"""CLIP's pre-tokenization pattern for the stdlib ``re`` (built once, ~0.3 s).

    ``re`` has no ``\p{..}`` classes, so the letter (L*) and number (N*) categories are
    spelled out as ranges from ``unicodedata``. Special tokens are split out earlier.
    """
    majors = _major_categories()
    letters, numbers = _char_class(majors, "L"), _char_class(majors, "N")
    return re.compile(f"'s|'t|'re|'ve|'m|'ll|'d|[{letters}]+|[{numbers}]|[^{_WHITESPACE}{letters}{numbers}]+")


def pretokenize(text: str) -> list[str]:
    """Split cleaned text into CLIP's words: contractions, letter runs, single digits, symbol runs."""
    return _word_pattern().findall(text)


def _merge_ranks(merges: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
    return {pair: rank for rank, pair in enumerate(merges)}


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer: ``encode(text)`` gives the ids transformers gives.

    ``pad_id`` is what fills a sequence after its end token: CLIP-L (SD1, SDXL's first
    encoder) pads with ``<|endoftext|>`` (49407), SD2's OpenCLIP with ``!`` (id 0).
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        pad_id: int | None = None,
        source: str = "CLIP vocabulary",
    ) -> None:
        self.vocab = dict(vocab)
        self.source = source
        self._ranks = _merge_ranks(merges)
        self._byte_chars = bytes_to_unicode()
        _check_tables(self.vocab, merges, self._byte_chars.values(), source)
        self.bos_id = self.vocab[BOS_TOKEN]
        self.eos_id = self.vocab[EOS_TOKEN]
        self.pad_id = self.eos_id if pad_id is None else pad_id
        if not 0 <= self.pad_id < len(self.vocab):
            raise CheckpointError(f"{source}: pad id {self.pad_id} is outside the vocabulary of {len(self.vocab)}")
        self._word_ids = functools.lru_cache(maxsize=BPE_CACHE_SIZE)(self._bpe_ids)

    @classmethod
    def from_package(cls, *, pad_id: int | None = None) -> CLIPTokenizer:
        """The tokenizer of CLIP's own ``bpe_simple_vocab_16e6.txt.gz``, shipped with latentrt."""
        vocab, merges = _package_tables()
        return cls(vocab, merges, pad_id=pad_id, source=f"latentrt package data {PACKAGE_VOCAB}")

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path, *, pad_id: int | None = None) -> CLIPTokenizer:
        """A tokenizer from a Hugging Face ``vocab.json`` + ``merges.txt`` pair."""
        vocab = _read_vocab_json(Path(vocab_json))
        merges = _read_merges_txt(Path(merges_txt))
        return cls(vocab, merges, pad_id=pad_id, source=f"{vocab_json} + {merges_txt}")

    @classmethod
    def from_folder(cls, folder: str | Path, *, pad_id: int | None = None) -> CLIPTokenizer:
        """A diffusers ``tokenizer/`` folder's tokenizer; its pad token when ``pad_id`` is None.

        Reads ``vocab.json`` + ``merges.txt``, or a fast tokenizer's ``tokenizer.json`` (BPE
        model) when those are absent. The pad token is read from ``special_tokens_map.json``
        or ``tokenizer_config.json``
        (SD2 folders say ``!``); without either the end token pads, as in CLIP-L.
        """
        directory = Path(folder)
        if not (directory / "vocab.json").exists() and (directory / "tokenizer.json").exists():
            vocab, merges = _read_tokenizer_json(directory / "tokenizer.json")
            tokenizer = cls(vocab, merges, pad_id=pad_id, source=str(directory / "tokenizer.json"))
        else:
            tokenizer = cls.from_files(directory / "vocab.json", directory / "merges.txt", pad_id=pad_id)
        if pad_id is None:
            pad_token = _configured_pad_token(directory)
            if pad_token is not None:
                tokenizer.pad_id = tokenizer.token_id(pad_token)
        return tokenizer

    @property
    def comma_id(self) -> int:
        """The id of a word-final comma (``,</w>``), where A1111 prefers to cut long prompts."""
        return self.token_id("," + END_OF_WORD)

    def token_id(self, token: str) -> int:
        """The id of one vocabulary entry, e.g. ``"cat</w>"``."""
        try:
            return self.vocab[token]
        except KeyError:
            raise CheckpointError(f"{self.source}: token {token!r} is not in the vocabulary") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without the start and end tokens and without truncation."""
        if not isinstance(text, str):
            raise InvalidRequest(f"text to tokenize must be a string, got {type(text).__name__}")
        _check_encodable(text)
        ids: list[int] = []
        for segment in _SPECIAL_TOKENS.split(text):
            if segment in (BOS_TOKEN, EOS_TOKEN):
                ids.append(self.vocab[segment])
                continue
            for word in pretokenize(clean_text(segment)):
                ids.extend(self._word_ids("".join(self._byte_chars[b] for b in word.encode("utf-8"))))
        return ids

    def _bpe_ids(self, word: str) -> tuple[int, ...]:
        """BPE on one byte-mapped word (CLIP's ``bpe``): merge the best-ranked pair until none applies."""
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            best = min(itertools.pairwise(symbols), key=lambda pair: self._ranks.get(pair, _NOT_A_MERGE))
            if best not in self._ranks:
                break
            symbols = _merge_pair(symbols, best)
        return tuple(self.vocab[symbol] for symbol in symbols)


def _check_encodable(text: str) -> None:
    """Refuse text UTF-8 cannot encode (lone surrogates, e.g. from a bad JSON escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise InvalidRequest(
            f"the prompt contains U+{ord(bad):04X} (a lone surrogate) at position {exc.start}; send valid Unicode text"
        ) from None


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every non-overlapping occurrence of ``pair``, left to right, by its merge."""
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def _check_tables(
    vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], chars: Iterable[str], source: str
) -> None:
    """Refuse a vocabulary that cannot tokenize every byte or lacks a merge result or special."""
    for token in (BOS_TOKEN, EOS_TOKEN):
        if token not in vocab:
            raise CheckpointError(f"{source}: the vocabulary has no {token} token; is this a CLIP tokenizer?")
    missing = [c + end for c in chars for end in ("", END_OF_WORD) if c + end not in vocab]
    if missing:
        raise CheckpointError(f"{source}: the vocabulary lacks byte symbols such as {missing[:3]}")
    for line, (first, second) in enumerate(merges, start=1):
        if first + second not in vocab:
            raise CheckpointError(f"{source}: merge {line} ({first} {second}) gives a token the vocabulary lacks")


@functools.cache
def _package_tables() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges derived from CLIP's BPE file, as ``SimpleTokenizer`` does.

    Vocabulary order: the 256 byte symbols, the same with ``</w>``, one entry per merge,
    then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
    """
    resource = resources.files("latentrt.plugins.stable_diffusion").joinpath("data").joinpath(PACKAGE_VOCAB)
    where = f"latentrt package data {PACKAGE_VOCAB}"
    try:
        lines = gzip.decompress(resource.read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}: unreadable ({exc}); reinstall latentrt") from exc
    # Line 0 is the "#version" header; CLIP keeps the next CLIP_MERGE_COUNT lines.
    merges = _parse_merge_lines(lines[1 : CLIP_MERGE_COUNT + 1], where, first_line=2)
    if len(merges) != CLIP_MERGE_COUNT:
        raise CheckpointError(f"{where}: {len(merges)} merges, expected {CLIP_MERGE_COUNT}; reinstall latentrt")
    byte_symbols = list(bytes_to_unicode().values())
    tokens = [*byte_symbols, *(s + END_OF_WORD for s in byte_symbols), *(a + b for a, b in merges)]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def _parse_merge_lines(lines: Sequence[str], where: str, first_line: int) -> list[tuple[str, str]]:
    """``"a b"`` lines as pairs; blank lines are skipped, anything else is a CheckpointError."""
    merges: list[tuple[str, str]] = []
    for number, line in enumerate(lines, start=first_line):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise CheckpointError(f"{where}: line {number} is not a merge of two symbols: {line[:60]!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_vocab_json(path: Path) -> dict[str, int]:
    """A ``vocab.json`` token -> id map, checked to be one."""
    data = read_json(path)
    if not all(isinstance(k, str) and isinstance(v, int) for k, v in data.items()):
        raise CheckpointError(f"{path}: expected a JSON object of token -> integer id")
    return data


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a Hugging Face fast tokenizer file (``model.type == "BPE"``).

    Merges are stored as ``"a b"`` strings (older files) or ``["a", "b"]`` pairs (newer).
    """
    model = read_json(path).get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise CheckpointError(f"{path}: not a BPE tokenizer (model.type is not 'BPE')")
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
        raise CheckpointError(f"{path}: model.vocab is not a token -> id object")
    if not isinstance(merges, list):
        raise CheckpointError(f"{path}: model.merges is not a list")
    lines = [" ".join(m) if isinstance(m, list) else str(m) for m in merges]
    return vocab, _parse_merge_lines(lines, str(path), first_line=1)


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    """A ``merges.txt``: an optional ``#version`` header, then one ``first second`` pair a line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing; a CLIP tokenizer needs vocab.json and merges.txt") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from exc
    lines = text.split("\n")
    start = 1 if lines and lines[0].startswith("#version") else 0
    merges = _parse_merge_lines(lines[start:], str(path), first_line=start + 1)
    if not merges:
        raise CheckpointError(f"{path}: no merges found")
    return merges


def _configured_pad_token(directory: Path) -> str | None:
    """The pad token named by a Hugging Face tokenizer folder's JSON files, if any."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        pad = read_json(path).get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str):
            return pad
    return None
