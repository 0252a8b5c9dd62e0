"""Masking: every value and encoding, however the stream is cut, and nothing else touched."""

from __future__ import annotations

import base64
import json
import random
from urllib.parse import quote

import pytest

from narwhal.execution.transport import LineSplitter
from narwhal.masking import Masker, encodings

SECRETS = {
    "TOKEN": "ghp_abcdEFGH1234/+=x y",
    "KEY": "-----BEGIN-----\nline one\nline two\n-----END-----",
    "SHORT_IN_LONG": "abcdefgh",  # also the start of LONG: the longer one must win
    "LONG": "abcdefgh-and-more",
}


def stream(masker: Masker, chunks: list[bytes]) -> bytes:
    return b"".join(masker.feed(c) for c in chunks) + masker.flush()


def cuts(data: bytes, rng: random.Random) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = rng.choice([1, 1, 2, 3, 7, 50])
        out.append(data[i:i + n])
        i += n
    return out


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_every_spelling_is_masked(name):
    masker = Masker(SECRETS)
    for spelling in encodings(SECRETS[name]):
        out = masker.mask_text(f"before {spelling} after")
        assert out == f"before [masked:{name}] after" or out.startswith("before [masked:"), spelling


def test_the_encodings_are_the_common_ones():
    value = SECRETS["TOKEN"]
    spellings = encodings(value)
    assert value in spellings
    assert base64.b64encode(value.encode()).decode() in spellings
    assert quote(value, safe="") in spellings
    assert json.dumps(SECRETS["KEY"])[1:-1] in encodings(SECRETS["KEY"])


def test_a_value_cut_anywhere_is_still_masked():
    masker = Masker(SECRETS)
    text = ("x" * 10 + SECRETS["TOKEN"] + "\n" + SECRETS["KEY"] + " mid " + SECRETS["LONG"]
            + base64.b64encode(SECRETS["TOKEN"].encode()).decode() + " end").encode()
    expected = masker.mask_bytes(text)
    assert b"ghp_" not in expected and b"line one" not in expected
    rng = random.Random(7)
    for _ in range(300):
        assert stream(masker, cuts(text, rng)) == expected


def test_byte_by_byte_and_a_trailing_prefix():
    masker = Masker(SECRETS)
    data = ("ab" + SECRETS["TOKEN"] + "ghp_ab").encode()  # ends in the start of a value: no value
    out = stream(masker, [bytes([b]) for b in data])
    assert out == b"ab[masked:TOKEN]ghp_ab"


def test_the_longest_value_wins_and_text_is_left_alone():
    masker = Masker(SECRETS)
    assert masker.mask_text("abcdefgh-and-more!") == "[masked:LONG]!"
    assert masker.mask_text("abcdefgh-and-less") == "[masked:SHORT_IN_LONG]-and-less"
    assert stream(masker, [b"abcdefgh", b"-and-", b"more"]) == b"[masked:LONG]"
    assert stream(masker, [b"abcdefgh", b"-and-", b"less"]) == b"[masked:SHORT_IN_LONG]-and-less"
    plain = "nothing secret here\n\u00e9\ufffd".encode()
    assert stream(masker, cuts(plain, random.Random(1))) == plain


def test_an_empty_masker_is_a_pass_through():
    masker = Masker({})
    assert not masker and masker.feed(b"abc") == b"abc" and masker.flush() == b""
    assert "TOKEN" not in repr(Masker(SECRETS)) or SECRETS["TOKEN"] not in repr(Masker(SECRETS))


def test_masking_happens_before_lines_are_cut():
    """A value split by the line-length cut or across lines is masked before either."""
    lines: list[str] = []
    splitter = LineSplitter(on_lines=lines.extend, max_line=40, masker=Masker(SECRETS))
    payload = ("y" * 30 + SECRETS["TOKEN"] + "\n" + SECRETS["KEY"] + "\n").encode()
    for chunk in cuts(payload, random.Random(3)):
        splitter.feed(chunk)
    splitter.flush()
    joined = "\n".join(lines)
    assert "ghp_" not in joined and "line one" not in joined and "-----BEGIN" not in joined
    assert "[masked:KEY]" in joined
