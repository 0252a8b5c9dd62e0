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


# --- attack pass: spellings a step produces without meaning to ------------------------------


def _pure_groups(text: bytes, start: int, end: int) -> list[str]:
    """The 4-character groups of base64(text) that encode bytes [start, end) of it only."""
    encoded = base64.b64encode(text).decode()
    return [encoded[4 * g:4 * g + 4] for g in range(len(text) // 3) if start <= 3 * g and 3 * g + 3 <= end]


@pytest.mark.parametrize("prefix", ["", "u", "us", "user:", "x-access-token:"])
@pytest.mark.parametrize("suffix", ["", "\n", ":x", "@host"])
def test_attack_a_value_inside_a_longer_base64_text_is_masked(prefix, suffix):
    """`curl -v -u "user:$TOKEN"` prints `Authorization: Basic base64(user:TOKEN)`: the value sits
    at any offset of the encoded text, so its own spelling (aligned at 0) never matched."""
    value = "Zq7-s3cr3t-T0ken-value!"
    masker = Masker({"TOKEN": value})
    text = (prefix + value + suffix).encode()
    out = masker.mask_text("Authorization: Basic " + base64.b64encode(text).decode())
    assert "[masked:TOKEN]" in out
    leaked = [g for g in _pure_groups(text, len(prefix), len(prefix) + len(value)) if g in out]
    assert leaked == [], out


def test_attack_a_multi_line_value_is_masked_line_by_line():
    """A key read line by line (`while read l; do echo "> $l"; done`), or through a tool that
    turns its CRLF into LF, never printed the value whole: each line of it was readable."""
    value = ("-----BEGIN KEY-----\r\nMIIEpAIBAAKCAQEA1234567890abcdXYZ\r\n"
             "QWERTYUIOPasdfghjklZXCVBNM098765\r\n-----END KEY-----\r\n")
    masker = Masker({"KEY": value})
    body = ["MIIEpAIBAAKCAQEA1234567890abcdXYZ", "QWERTYUIOPasdfghjklZXCVBNM098765"]
    printed = ["\n".join("> " + line for line in value.splitlines()),
               value.replace("\r\n", "\n"), value.replace("\r\n", "\n").rstrip("\n"),
               value.replace("\r\n", "\r\r\n")]
    for text in printed:
        out = masker.mask_text(text)
        assert not any(line in out for line in body), out
        assert stream(Masker({"KEY": value}), cuts(text.encode(), random.Random(5))).decode() == out


def test_attack_a_value_with_surrounding_blanks_is_masked_without_them():
    """A file with a trailing blank line keeps it (only one newline is dropped at load), but
    `$(cat /run/secrets/T)` and `echo $T` drop every trailing newline and blank."""
    value = "tok3n-value-0123456789\n\n"
    masker = Masker({"T": value})
    for text in ("tok3n-value-0123456789", "x=tok3n-value-0123456789;", " tok3n-value-0123456789 \n"):
        assert "0123456789" not in masker.mask_text(text), text


def test_attack_a_value_in_another_unicode_normal_form_is_masked():
    """The same text in NFD (macOS file names, some JSON and terminal tools) is other bytes."""
    import unicodedata

    value = "p\u00e4ssw\u00f6rd-geheim-\u00e9t\u00e9"
    masker = Masker({"PW": value})
    for form in ("NFD", "NFKD"):
        assert masker.mask_text("pw=" + unicodedata.normalize(form, value)) == "pw=[masked:PW]"
    assert masker.mask_text(unicodedata.normalize("NFD", value) + "x") == "[masked:PW]x"
