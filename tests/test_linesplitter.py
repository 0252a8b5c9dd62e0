"""LineSplitter: lines out of a byte stream, with memory bounded by max_line whatever a step prints."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from narwhal.config.settings import DEFAULT_SETTINGS, KiB, MiB, parse_settings
from narwhal.execution.transport import LineSplitter, LocalTransport

CHUNK = 64 * KiB


def marker(cap: int) -> str:
    return f"\u2026 [narwhal: line cut at {cap} bytes]"


class Recorder:
    def __init__(self, cap: int | None = None, batches: bool = True):
        self.batches: list[list[str]] = []
        self.splitter = (LineSplitter(on_lines=self.batches.append, max_line=cap) if batches
                         else LineSplitter(on_line=lambda line: self.batches.append([line]), max_line=cap))

    @property
    def lines(self) -> list[str]:
        return [line for batch in self.batches for line in batch]

    def feed(self, *chunks: bytes) -> Recorder:
        for chunk in chunks:
            self.splitter.feed(chunk)
            assert len(self.splitter._partial) <= self.splitter.max_line
        self.splitter.flush()
        return self


def reference_split(chunks: list[bytes]) -> list[str]:
    """The splitter as it was before the cap (unbounded, re-joins each read): the oracle for short lines."""
    out: list[str] = []
    partial = b""
    for data in chunks:
        if not data:
            continue
        data = partial + data
        cut = data.rfind(b"\n")
        if cut < 0:
            partial = data
            continue
        partial = data[cut + 1:]
        out.extend(data[:cut].decode("utf-8", errors="replace").split("\n"))
    if partial:
        out.append(partial.decode("utf-8", errors="replace"))
    return out


def test_default_cap_is_the_setting():
    assert DEFAULT_SETTINGS.max_line == 64 * KiB
    assert LineSplitter(print).max_line == 64 * KiB
    assert parse_settings({"max_line": "1m"}).max_line == MiB
    assert LineSplitter.limit(parse_settings({"max_line": "16k"})) == 16 * KiB
    assert LineSplitter.limit({"max_line": 100}) == 100
    assert LineSplitter.limit(None) == LineSplitter.limit({}) == 64 * KiB
    assert LocalTransport(settings={"max_line": 7})._max_line == 7
    with pytest.raises(ValueError):
        LineSplitter(print, max_line=0)


def test_finding6_200_mb_without_newline_is_one_cut_line_and_memory_stays_bounded():
    cap = 64 * KiB
    rec = Recorder(cap)
    chunk = b"a" * CHUNK
    for _ in range(200 * MiB // CHUNK):
        rec.splitter.feed(chunk)
        assert len(rec.splitter._partial) <= cap  # bounded at every feed, not only at the end
    rec.splitter.feed(b"aaa\nnext line\n")
    rec.splitter.flush()
    assert rec.lines == ["a" * cap + marker(cap), "next line"]


def test_cut_line_goes_out_as_soon_as_it_passes_the_cap():
    rec = Recorder(10)
    rec.splitter.feed(b"0123456789")
    assert rec.lines == []  # exactly at the cap: still a line that may end
    rec.splitter.feed(b"X")
    assert rec.lines == ["0123456789" + marker(10)]
    rec.splitter.feed(b"dropped" * 100)
    rec.splitter.feed(b"still dropped\nkept\npart")
    rec.splitter.flush()
    assert rec.lines == ["0123456789" + marker(10), "kept", "part"]


@pytest.mark.parametrize("chunks", [
    [b"0123456789\n"],
    [b"01234", b"56789", b"\n"],
    [b"0123456789", b"\n"],
    [b"x\n0123456789\ny\n"],
])
def test_a_line_exactly_at_the_cap_is_whole(chunks):
    lines = Recorder(10).feed(*chunks).lines
    assert "0123456789" in lines and not any("narwhal" in line for line in lines)


@pytest.mark.parametrize("chunks", [
    [b"0123456789A\nok\n"],  # in one chunk larger than the cap
    [b"012345", b"6789A\nok\n"],  # completed by the chunk with the newline
    [b"0123456789", b"A", b"\nok\n"],  # passes the cap without a newline
    [b"ok\n0123456789ABCDEF\nok\n"],  # between two lines of one chunk
])
def test_one_byte_over_the_cap_is_cut_wherever_the_chunks_fall(chunks):
    lines = Recorder(10).feed(*chunks).lines
    assert [line for line in lines if line != "ok"] == ["0123456789" + marker(10)]
    assert lines[-1] == "ok"


def test_a_cut_line_never_ends_in_half_a_character():
    # "é" is two bytes, "€" three, "𝄞" four: the cap falls inside each of them
    for char in ("é", "€", "𝄞"):
        for prefix in range(1, 5):
            line = ("a" * prefix + char * 10).encode()
            cap = prefix + 1
            for chunks in ([line + b"\n"], [line[:cap], line[cap:], b"\n"], [bytes([b]) for b in line]):
                [cut] = Recorder(cap).feed(*chunks).lines
                text = cut.removesuffix(marker(cap))
                assert "\ufffd" not in text and text == "a" * prefix, (char, prefix, chunks)


def test_short_lines_are_unchanged_byte_for_byte():
    stream = b"".join(b"line %d caf\xc3\xa9 \xff\t\x1b[31mred\x1b[0m\r\n" % i for i in range(5000))
    chunks = [stream[i:i + 4093] for i in range(0, len(stream), 4093)]
    rec = Recorder()
    rec.feed(*chunks)
    assert rec.lines == reference_split(chunks)
    assert len(rec.batches) <= len(chunks)  # still one batch per read at most


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=30), st.integers(min_value=40, max_value=200))
def test_lines_within_the_cap_match_the_unbounded_splitter(chunks, cap):
    joined = b"".join(chunks)
    if any(len(line) > cap for line in joined.split(b"\n")):
        return
    assert Recorder(cap).feed(*chunks).lines == reference_split(chunks)
    assert Recorder(cap, batches=False).feed(*chunks).lines == reference_split(chunks)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=40), st.integers(min_value=1, max_value=50))
def test_any_stream_keeps_its_line_count_and_every_line_is_bounded(chunks, cap):
    lines = Recorder(cap).feed(*chunks).lines
    assert len(lines) == len(reference_split(chunks))
    for line in lines:
        assert len(line.removesuffix(marker(cap)).encode("utf-8", errors="surrogatepass")) <= 3 * cap


def test_the_bench_shows_the_bound():
    from bench.linesplit import UnboundedSplitter, measure

    bounded = measure(lambda cb: LineSplitter(on_lines=cb), 8)
    unbounded = measure(UnboundedSplitter, 8)
    assert bounded["longest_line"] == 64 * KiB + len(marker(64 * KiB))
    assert unbounded["longest_line"] == 8 * MiB
    assert bounded["peak_mib"] < 1 < 8 <= unbounded["peak_mib"]
