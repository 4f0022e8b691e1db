"""The CLIP BPE tokenizer against transformers' ``CLIPTokenizer`` (test-only reference).

The reference is built from a ``vocab.json`` + ``merges.txt`` pair that this test derives
from the shipped ``bpe_simple_vocab_16e6.txt.gz`` the way CLIP's ``SimpleTokenizer`` does
(byte symbols, the same with ``</w>``, one entry per merge, then the two specials), so the
two implementations share nothing but the data file.
"""

from __future__ import annotations

import gzip
import html
import json
import random
import unicodedata
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from latentrt.core.errors import CheckpointError, InvalidRequest
from latentrt.plugins.stable_diffusion.prompt import parse_prompt_attention
from latentrt.plugins.stable_diffusion.tokenizer import CLIPTokenizer, clean_text, pretokenize

A_PHOTO_OF_A_CAT = [49406, 320, 1125, 539, 320, 2368, 49407]  # REFERENCE.md


def _gpt2_byte_symbols() -> list[str]:
    """GPT-2 / CLIP byte symbols in vocabulary order, re-derived independently."""
    kept = [b for b in range(256) if (33 <= b <= 126) or (161 <= b <= 172) or (174 <= b <= 255)]
    moved = [b for b in range(256) if b not in kept]
    return [chr(b) for b in kept] + [chr(256 + i) for i in range(len(moved))]


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers-style ``tokenizer/`` folder derived from the shipped BPE file."""
    package = resources.files("latentrt.plugins.stable_diffusion")
    data = package.joinpath("data").joinpath("bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(data.read_bytes()).decode("utf-8").split("\n")
    merges = [line.split() for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = _gpt2_byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def reference(hf_files: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(hf_files))


@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return CLIPTokenizer.from_package()


# --- prompt corpus ------------------------------------------------------------------

HANDWRITTEN = [
    "a photo of a cat",
    "A Photo Of A CAT!!!",
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile",
    "portrait of a woman, 85mm, f/1.8, bokeh, 4k, 8K UHD, HDR, trending on artstation",
    "it's a dog's life; they're here, we've gone, I'm fine, you'll see, he'd go",
    "IT'S LOUD -- DON'T SHOUT",
    "rock'n'roll 'quoted' ''double'' ' s 's",
    "price: $1,234.56 (about 1.2e3) -- 50% off!? #hashtag @user",
    "3.14159 2024-01-01 12:30:45 v1.5 sd_xl_base_1.0 x2 1080p",
    "e-mail: someone@example.com, url: https://example.com/path?q=1&b=2",
    "C++ & C# vs. Python <3 ... \u2026 ~~~ ^_^ :-) ;) <|x|>",
    "a<|endoftext|>b <|startoftext|> c",
    "tabs\tand\nnewlines\r\nand   spaces",
    "  leading and trailing   ",
    "non\u00a0breaking\u2003em\u3000ideographic\u2028line\u2029para",
    "caf\u00e9 cafe\u0301 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m \u212bngstr\u00f6m",
    "\u00fcber stra\u00dfe STRASSE \u1e9e gro\u00df",
    "\u03ba\u03b1\u03bb\u03b7\u03bc\u03ad\u03c1\u03b1 \u039f\u0394\u039f\u03a3",
    "\u043f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440, \u041a\u041e\u0428\u041a\u0410",
    "\u732b\u304c\u597d\u304d \u3053\u3093\u306b\u3061\u306f\u4e16\u754c \u30ab\u30bf\u30ab\u30ca",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8 \u4e2d\u6587\u63d0\u793a\u8bcd\uff0c\u9ad8\u8d28\u91cf",
    "\u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd "
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",
    "emoji \U0001f431\U0001f436 \U0001f468\u200d\U0001f469\u200d\U0001f467 "
    "\U0001f44d\U0001f3fd \U0001f1ef\U0001f1f5 \u2764\ufe0f",
    "\uff26\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48 \uff11\uff12\uff13 "
    "\ufb01ne \u2460\u2461 \u00bd \u2153 \u00b2",
    "don\u2019t \u201cquoted\u201d \u2018single\u2019 \u00abguillemets\u00bb \u2014 dash",
    "\u0130stanbul \u0131 \u017f 'S 'T 'RE 'VE 'M 'LL 'D",
    "\u2167 \u216b roman \u0663\u0664\u0665 \u0969 digits \U0001d7d8",
    "\x1c\x1d\x1e\x1f controls \x00 \x07 \x7f \u200b zero width",
    "",
    "   ",
]

_ALPHABETS = {
    "latin": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "digits": "0123456789",
    "punct": "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "space": " \t\n\r\x0b\x0c\u00a0\u2002\u3000  ",
    "accented": "\u00e0\u00e1\u00e2\u00e3\u00e4\u00e5\u00e7\u00e8\u00e9\u00ea\u00f1"
    "\u00f6\u00f8\u00fc\u0153\u00c9\u00d6\u00dc\u0301\u0308",
}


def _assigned_chars(low: int, high: int) -> str:
    """Characters assigned in this Python's Unicode database (see the tokenizer's limits)."""
    return "".join(chr(c) for c in range(low, high) if unicodedata.category(chr(c)) not in ("Cn", "Cs"))


_BLOCKS = [
    _assigned_chars(0x0370, 0x0400),  # Greek
    _assigned_chars(0x0400, 0x0500),  # Cyrillic
    _assigned_chars(0x0590, 0x0700),  # Hebrew, Arabic
    _assigned_chars(0x0900, 0x0E80),  # Indic, Thai, Lao
    _assigned_chars(0x2000, 0x2BFF),  # punctuation, symbols, arrows, math
    _assigned_chars(0x3000, 0x3100),  # CJK punctuation, kana
    _assigned_chars(0x4E00, 0x4F00),  # CJK ideographs
    _assigned_chars(0xAC00, 0xAD00),  # Hangul
    _assigned_chars(0xFF00, 0xFFF0),  # full-width forms
    _assigned_chars(0x1F300, 0x1FAFF),  # emoji
    _assigned_chars(0x1D400, 0x1D800),  # mathematical alphanumerics
]


def _random_prompt(rng: random.Random) -> str:
    """Words drawn from a mix of alphabets, joined by varied separators."""
    pools = [*_ALPHABETS.values(), *_BLOCKS]
    words = []
    for _ in range(rng.randint(1, 12)):
        pool = rng.choice(pools) if rng.random() < 0.5 else _ALPHABETS["latin"]
        words.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 9))))
    separators = [" ", ", ", "  ", "\t", "-", "'s ", "'", "", "\n", ". "]
    return "".join(word + rng.choice(separators) for word in words)


def _weighted_prompt(rng: random.Random) -> str:
    words = ["cat", "dog", "red", "castle", "sunset", "highly detailed", "oil painting", "8k"]
    parts = []
    for word in rng.sample(words, 5):
        form = rng.choice(["{}", "({})", "(({}))", "[{}]", "({}:1.3)", "({}: 0.8)", "\\({}\\)", "{} BREAK"])
        parts.append(form.format(word))
    return ", ".join(parts)


def _corpus() -> list[str]:
    rng = random.Random(20240601)
    prompts = list(HANDWRITTEN)
    prompts += [_random_prompt(rng) for _ in range(250)]
    long_words = ["beautiful", "landscape", "mountains", "lake", "reflection", "golden", "hour", "clouds"]
    prompts += [", ".join(rng.choice(long_words) for _ in range(rng.randint(80, 300))) for _ in range(10)]
    # Weighting syntax stripped: the pieces parse_prompt_attention leaves, and their join.
    for _ in range(40):
        pieces = [text for text, weight in parse_prompt_attention(_weighted_prompt(rng)) if weight != -1]
        prompts += [*pieces, "".join(pieces)]
    # HTML entities are the one documented difference (we unescape like CLIP): leave them out.
    return [p for p in prompts if html.unescape(p) == p]


CORPUS = _corpus()


def test_corpus_is_varied() -> None:
    assert len(CORPUS) > 300
    assert any(len(p) > 1000 for p in CORPUS)
    assert any(ord(c) > 0x10000 for p in CORPUS for c in p)


def test_known_example(ours: CLIPTokenizer) -> None:
    assert [ours.bos_id, *ours.encode("a photo of a cat"), ours.eos_id] == A_PHOTO_OF_A_CAT
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.comma_id, len(ours.vocab)) == (49406, 49407, 49407, 267, 49408)


def test_ids_match_transformers(ours: CLIPTokenizer, reference: Any) -> None:
    expected = reference(CORPUS, add_special_tokens=False)["input_ids"]
    mismatches = [(p, ours.encode(p), e) for p, e in zip(CORPUS, expected, strict=True) if ours.encode(p) != e]
    assert not mismatches, f"{len(mismatches)} of {len(CORPUS)} differ, first: {mismatches[0]}"


def test_specials_match_transformers(ours: CLIPTokenizer, reference: Any) -> None:
    text = "a photo of a cat"
    assert reference(text)["input_ids"] == A_PHOTO_OF_A_CAT
    assert ours.encode("x<|endoftext|>y") == reference("x<|endoftext|>y", add_special_tokens=False)["input_ids"]
    assert ours.encode("<|startoftext|>") == [49406]


def test_from_files_equals_from_package(ours: CLIPTokenizer, hf_files: Path) -> None:
    from_files = CLIPTokenizer.from_files(hf_files / "vocab.json", hf_files / "merges.txt")
    assert from_files.vocab == ours.vocab
    assert from_files._ranks == ours._ranks
    assert all(from_files.encode(p) == ours.encode(p) for p in CORPUS[:60])
    from_folder = CLIPTokenizer.from_folder(hf_files)
    assert from_folder.pad_id == 49407  # no pad token configured: CLIP-L pads with the end token


def test_html_entities_unescaped_twice_like_clip(ours: CLIPTokenizer) -> None:
    # A documented difference: transformers' fast tokenizer keeps "&amp;" verbatim.
    assert ours.encode("salt &amp; pepper") == ours.encode("salt & pepper")
    assert ours.encode("salt &amp;amp; pepper") == ours.encode("salt & pepper")
    assert clean_text("  A&lt;B  \t C ") == "a<b c"


def test_cleanup_and_pretokenize() -> None:
    assert clean_text("Cafe\u0301\u00a0\u00a0OK") == "caf\u00e9 ok"  # NFC, whitespace, lowercase
    assert clean_text("\u039f\u0394\u039f\u03a3") == "\u03bf\u03b4\u03bf\u03c3"  # per-char lowercase (no final sigma)
    assert pretokenize("it's 2024, ok!?") == ["it", "'s", "2", "0", "2", "4", ",", "ok", "!?"]
    assert pretokenize("\u732b\u72ac cat\x1c") == ["\u732b\u72ac", "cat", "\x1c"]


def test_pad_id_and_sd2_folder(hf_files: Path, tmp_path: Path) -> None:
    assert CLIPTokenizer.from_package(pad_id=0).pad_id == 0
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((hf_files / name).read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}), encoding="utf-8")
    assert CLIPTokenizer.from_folder(tmp_path).pad_id == 0  # SD2 / OpenCLIP pads with "!"
    assert CLIPTokenizer.from_folder(tmp_path, pad_id=49407).pad_id == 49407
    with pytest.raises(CheckpointError, match="pad id"):
        CLIPTokenizer.from_package(pad_id=50000)


def test_bpe_cache_is_consistent(ours: CLIPTokenizer) -> None:
    first = ours.encode("supercalifragilisticexpialidocious")
    assert ours.encode("supercalifragilisticexpialidocious") == first
    assert ours._word_ids.cache_info().hits >= 1


def test_non_string_text_is_invalid(ours: CLIPTokenizer) -> None:
    with pytest.raises(InvalidRequest, match="string"):
        ours.encode(["a cat"])  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match=r"U\+D83D"):
        ours.encode("a cat \ud83d")


@pytest.mark.parametrize(
    ("vocab", "merges", "match"),
    [
        (None, "#version: 0.2\ni n\n", "vocab.json: missing"),
        ("{not json", "#version: 0.2\ni n\n", "not valid JSON"),
        ('["a list"]', "#version: 0.2\ni n\n", "JSON object"),
        ('{"a": "one"}', "#version: 0.2\ni n\n", "token -> integer"),
        ('{"a": 1}', "#version: 0.2\ni n\n", "<|startoftext|>"),
        ("FULL", None, "merges.txt: missing"),
        ("FULL", "#version: 0.2\ni n x\n", "line 2"),
        ("FULL", "#version: 0.2\n", "no merges"),
        ("FULL", "#version: 0.2\nq z\n", "merge 1"),
    ],
)
def test_bad_files_name_the_file(
    hf_files: Path, tmp_path: Path, vocab: str | None, merges: str | None, match: str
) -> None:
    if vocab == "FULL":
        (tmp_path / "vocab.json").write_bytes((hf_files / "vocab.json").read_bytes())
    elif vocab is not None:
        (tmp_path / "vocab.json").write_text(vocab, encoding="utf-8")
    if merges is not None:
        (tmp_path / "merges.txt").write_text(merges, encoding="utf-8")
    with pytest.raises(CheckpointError, match=match) as info:
        CLIPTokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert str(tmp_path) in str(info.value)


def test_vocabulary_without_byte_symbols_is_refused() -> None:
    with pytest.raises(CheckpointError, match="byte symbols"):
        CLIPTokenizer({"<|startoftext|>": 0, "<|endoftext|>": 1}, [], source="tiny")


def test_from_folder_reads_a_fast_tokenizer_json(tmp_path: Path) -> None:
    """transformers 5 saves only ``tokenizer.json``; a folder with just that loads the same ids."""
    from sd_fixtures import write_clip_tokenizer_files

    transformers = pytest.importorskip("transformers")
    reference = transformers.CLIPTokenizer.from_pretrained(str(write_clip_tokenizer_files(tmp_path / "files")))
    saved = tmp_path / "saved"
    reference.save_pretrained(str(saved))
    for name in ("vocab.json", "merges.txt"):
        (saved / name).unlink(missing_ok=True)
    assert (saved / "tokenizer.json").exists()
    ours = CLIPTokenizer.from_folder(saved)
    for text in ("a photo of a cat", "Hello, world! (masterpiece:1.2) 日本語"):
        assert [ours.bos_id, *ours.encode(text), ours.eos_id] == reference(text)["input_ids"]
