"""A1111 prompt syntax and 75-token chunking.

Expected parses marked "A1111 doctest" are the published examples in the docstring of
``parse_prompt_attention`` in AUTOMATIC1111/stable-diffusion-webui ``modules/prompt_parser.py``;
the chunking cases follow ``tokenize_line`` in ``modules/sd_hijack_clip.py``.
"""

from __future__ import annotations

import pytest

from latentrt.core.errors import InvalidRequest
from latentrt.plugins.stable_diffusion.prompt import (
    PromptChunk,
    empty_chunk,
    pad_chunk_counts,
    parse_prompt_attention,
    tokenize_weighted,
)
from latentrt.plugins.stable_diffusion.tokenizer import CLIPTokenizer

BOS, EOS, COMMA = 49406, 49407, 267


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.from_package()


def _tokens(chunk: PromptChunk) -> list[int]:
    """The prompt tokens of a chunk: between BOS and the first EOS."""
    return chunk.ids[1 : chunk.ids.index(EOS)]


# --- parse_prompt_attention ------------------------------------------------------------

A1111_DOCTESTS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), A1111_DOCTESTS)
def test_a1111_doctests(text: str, expected: list[tuple[str, float]]) -> None:
    # Exact floats: brackets multiply in A1111's order, so even the rounding agrees.
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("((word))", [("word", 1.1 * 1.1)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
        ("(word:1.3)", [("word", 1.3)]),
        ("(word: 1.3 )", [("word", 1.3)]),
        ("(word:-1)", [("word", -1.0)]),
        ("((word:1.5))", [("word", 1.5 * 1.1)]),
        ("a [b (c) d] e", [("a ", 1.0), ("b ", 1 / 1.1), ("c", 1.1 / 1.1), (" d", 1 / 1.1), (" e", 1.0)]),
        ("a) b] c", [("a) b] c", 1.0)]),  # stray closers are text
        ("a:1.2) b", [("a:1.2) b", 1.0)]),  # ":w)" without an opener is text
        ("[a:1.3)", [("a:1.3)", 1 / 1.1)]),  # ":w)" only closes a round bracket
        ("ratio 16:9", [("ratio 16:9", 1.0)]),
        ("back\\\\slash", [("back\\slash", 1.0)]),
        ("lone\\ back", [("lone back", 1.0)]),  # A1111 drops a backslash escaping nothing
        ("\\[x\\] \\(y\\)", [("[x] (y)", 1.0)]),
        ("", [("", 1.0)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("BREAKfast break BREAK", [("BREAKfast break", 1.0), ("BREAK", -1.0), ("", 1.0)]),
        # Deviation (module docstring): A1111 would weight a literal "BREAK" by -1.1 here.
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.0), ("b", 1.1)]),
        ("(x BREAK:-1)", [("x", -1.0), ("BREAK", -1.0), ("", -1.0)]),
    ],
)
def test_parse_edge_cases(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_attention(text) == expected


def test_bad_weight_and_non_string_are_invalid(tok: CLIPTokenizer) -> None:
    with pytest.raises(InvalidRequest, match=r"'1\.2\.3'.*e\.g\. \(word:1\.2\)"):
        parse_prompt_attention("(cat:1.2.3)")
    with pytest.raises(InvalidRequest, match="must be a string"):
        parse_prompt_attention(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="must be a string, got bytes"):
        tokenize_weighted(tok, b"a cat")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="chunk_length"):
        tokenize_weighted(tok, "a cat", chunk_length=0)


# --- tokenize_weighted -------------------------------------------------------------------


def test_short_prompt_is_one_padded_chunk(tok: CLIPTokenizer) -> None:
    (chunk,) = tokenize_weighted(tok, "a photo of a cat")
    assert chunk.ids == [BOS, 320, 1125, 539, 320, 2368, EOS] + [EOS] * 70
    assert chunk.weights == [1.0] * 77


def test_empty_prompt(tok: CLIPTokenizer) -> None:
    assert tokenize_weighted(tok, "") == [PromptChunk([BOS, EOS] + [EOS] * 75, [1.0] * 77)]
    assert tokenize_weighted(tok, "") == [empty_chunk(tok)]


def test_sd2_pad_id_fills_after_the_end_token() -> None:
    sd2 = CLIPTokenizer.from_package(pad_id=0)
    (chunk,) = tokenize_weighted(sd2, "a cat")
    assert chunk.ids == [BOS, 320, 2368, EOS] + [0] * 73


def test_weights_sit_on_their_tokens(tok: CLIPTokenizer) -> None:
    (chunk,) = tokenize_weighted(tok, "a (red:1.5) [cat] (on a mat)")
    assert chunk.ids[:8] == [BOS, 320, *tok.encode("red"), 2368, *tok.encode("on a mat"), EOS]
    assert chunk.weights[:8] == [1.0, 1.0, 1.5, 1 / 1.1, 1.1, 1.1, 1.1, 1.0]
    assert chunk.weights[8:] == [1.0] * 69


def test_each_piece_is_tokenized_alone(tok: CLIPTokenizer) -> None:
    # A1111 tokenizes every weighted piece separately, so a word split by a bracket splits.
    (chunk,) = tokenize_weighted(tok, "pho(tograph)")
    assert _tokens(chunk) == tok.encode("pho") + tok.encode("tograph")
    assert _tokens(chunk) != tok.encode("photograph")


def test_200_tokens_make_three_chunks(tok: CLIPTokenizer) -> None:
    prompt = " ".join(["cat"] * 200)
    chunks = tokenize_weighted(tok, prompt)
    assert [len(c.ids) for c in chunks] == [77, 77, 77]
    assert [len(c.weights) for c in chunks] == [77, 77, 77]
    assert [len(_tokens(c)) for c in chunks] == [75, 75, 50]
    assert [t for c in chunks for t in _tokens(c)] == tok.encode(prompt)
    assert all(c.ids[0] == BOS and c.ids[76] == EOS for c in chunks)


def test_exactly_75_tokens_fit_one_chunk(tok: CLIPTokenizer) -> None:
    assert len(tokenize_weighted(tok, "cat " * 75)) == 1
    assert len(tokenize_weighted(tok, "cat " * 76)) == 2


def test_long_weighted_run_keeps_weights_across_chunks(tok: CLIPTokenizer) -> None:
    chunks = tokenize_weighted(tok, "dog " * 70 + "(" + "cat " * 10 + ":1.4)")
    assert chunks[0].weights[1:71] == [1.0] * 70
    assert chunks[0].weights[71:76] == [1.4] * 5
    assert chunks[1].weights[1:6] == [1.4] * 5
    assert chunks[1].weights[6:] == [1.0] * 71


def test_comma_backtrack_moves_the_last_phrase(tok: CLIPTokenizer) -> None:
    # 70 tokens, a comma at index 70, then 10 more: the chunk fills at 75 with the comma
    # 5 back (<= 20), so the 4 tokens after the comma move to the next chunk.
    prompt = "cat " * 70 + ", " + "dog " * 10
    first, second = tokenize_weighted(tok, prompt)
    assert _tokens(first) == [2368] * 70 + [COMMA]
    assert first.ids[72:] == [EOS] * 5
    assert _tokens(second) == tok.encode("dog " * 10)
    assert first.weights == [1.0] * 77


def test_comma_too_far_back_is_a_hard_cut(tok: CLIPTokenizer) -> None:
    prompt = "cat " * 50 + ", " + "dog " * 40  # comma 25 tokens before the chunk end
    first, second = tokenize_weighted(tok, prompt)
    assert len(_tokens(first)) == 75
    assert _tokens(first)[50] == COMMA
    assert len(_tokens(second)) == 16


def test_backtrack_can_be_disabled(tok: CLIPTokenizer) -> None:
    prompt = "cat " * 70 + ", " + "dog " * 10
    first, _ = tokenize_weighted(tok, prompt, comma_padding_backtrack=0)
    assert len(_tokens(first)) == 75


def test_break_starts_a_new_chunk(tok: CLIPTokenizer) -> None:
    first, second = tokenize_weighted(tok, "a cat BREAK a (dog)")
    assert first.ids == [BOS, 320, 2368, EOS] + [EOS] * 73
    assert second.ids[:4] == [BOS, 320, 1929, EOS]
    assert second.weights[:4] == [1.0, 1.0, 1.1, 1.0]


def test_break_at_the_ends(tok: CLIPTokenizer) -> None:
    assert len(tokenize_weighted(tok, "a cat BREAK")) == 1  # nothing follows: no empty chunk
    leading = tokenize_weighted(tok, "BREAK a cat")  # A1111 emits an empty first chunk
    assert leading[0] == empty_chunk(tok)
    assert _tokens(leading[1]) == [320, 2368]
    assert len(tokenize_weighted(tok, "a BREAK BREAK b")) == 3


def test_pad_chunk_counts(tok: CLIPTokenizer) -> None:
    cond = tokenize_weighted(tok, "cat " * 160)
    uncond = tokenize_weighted(tok, "blurry")
    padded_cond, padded_uncond = pad_chunk_counts([cond, uncond], tok)
    assert padded_cond == cond
    assert len(padded_uncond) == 3
    assert padded_uncond[0] == uncond[0]
    assert padded_uncond[1] == padded_uncond[2] == empty_chunk(tok)
    assert padded_uncond[1] is not padded_uncond[2]
    assert pad_chunk_counts([], tok) == []


def test_pad_chunk_counts_refuses_mixed_lengths(tok: CLIPTokenizer) -> None:
    short = tokenize_weighted(tok, "cat", chunk_length=10)
    with pytest.raises(InvalidRequest, match="different lengths"):
        pad_chunk_counts([short, tokenize_weighted(tok, "cat")], tok)
