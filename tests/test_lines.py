"""Tests for supervisor.lines: line splitting, cleaning, cutting, and bounded memory."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.lines import MAX_LINE_BYTES, LineSplitter, clean_line


def feed_all(splitter: LineSplitter, chunks: list[bytes]) -> list[str]:
    out: list[str] = []
    for chunk in chunks:
        out.extend(splitter.feed(chunk))
    out.extend(splitter.flush())
    return out


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


# --- clean_line ---------------------------------------------------------------------------------


def test_clean_line_strips_ansi_csi_and_osc() -> None:
    raw = b"\x1b[31mERROR\x1b[0m  \x1b[2Kloading \x1b]0;title\x07done\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\   "
    assert clean_line(raw) == "ERROR  loading donelink"


def test_clean_line_replaces_invalid_utf8_and_strips_trailing_whitespace() -> None:
    assert clean_line(b"caf\xc3\xa9 \xff\xfe ok \t ") == "café \ufffd\ufffd ok"


def test_clean_line_drops_stray_escape() -> None:
    assert clean_line(b"abc\x1b") == "abc"


# --- splitting ----------------------------------------------------------------------------------


def test_all_terminators() -> None:
    s = LineSplitter()
    assert s.feed(b"a\nb\r\nc\rd") == ["a", "b", "c"]
    assert s.flush() == ["d"]
    assert s.lines == 4


def test_progress_bar_redraws_become_lines() -> None:
    s = LineSplitter()
    out = s.feed(b"\r 10%|#   |\r 50%|##  |\r100%|####|\n")
    # Only trailing whitespace is stripped; the leading space is part of the bar.
    assert out == [" 10%|#   |", " 50%|##  |", "100%|####|"]


def test_empty_lines_dropped() -> None:
    s = LineSplitter()
    assert s.feed(b"\n\n   \n\x1b[0m\nx\n\r\n") == ["x"]
    assert s.flush() == []
    assert s.lines == 1


def test_line_split_across_chunks_is_joined() -> None:
    s = LineSplitter()
    assert s.feed(b"hel") == []
    assert s.feed(b"lo wo") == []
    assert s.feed(b"rld\nnext") == ["hello world"]
    assert s.flush() == ["next"]


def test_crlf_split_between_chunks_gives_one_line() -> None:
    s = LineSplitter()
    assert s.feed(b"first\r") == ["first"]
    assert s.feed(b"\nsecond\r") == ["second"]
    assert s.feed(b"\n") == []
    assert s.feed(b"third\n") == ["third"]
    assert s.lines == 3


def test_cr_then_cr_in_next_chunk_is_not_swallowed() -> None:
    s = LineSplitter()
    assert s.feed(b"a\r") == ["a"]
    assert s.feed(b"\rb\r") == ["b"]


def test_multibyte_char_split_across_chunks() -> None:
    data = "ünïcödé ✓ 🚀\n".encode()
    for i in range(1, len(data)):
        s = LineSplitter()
        assert s.feed(data[:i]) + s.feed(data[i:]) == ["ünïcödé ✓ 🚀"], i


def test_flush_resets_state() -> None:
    s = LineSplitter()
    s.feed(b"partial")
    assert s.flush() == ["partial"]
    assert s.flush() == []
    assert s.buffered == 0


# --- cutting ------------------------------------------------------------------------------------


def test_long_line_cut_with_marker() -> None:
    s = LineSplitter(max_line_bytes=10)
    out = s.feed(b"0123456789abcdef\nshort\n")
    assert out == ["0123456789 …[cut 6 bytes]", "short"]
    assert s.cut == 1
    assert s.lines == 2


def test_long_line_cut_across_many_chunks_counts_all_dropped_bytes() -> None:
    s = LineSplitter(max_line_bytes=8)
    out: list[str] = []
    out += s.feed(b"abcd")
    out += s.feed(b"efghij")
    for _ in range(100):
        out += s.feed(b"x" * 50)
        assert s.buffered <= 8
    out += s.feed(b"yz\r\nnext\n")
    assert out == [f"abcdefgh …[cut {2 + 5000 + 2} bytes]", "next"]


def test_cut_line_at_eof() -> None:
    s = LineSplitter(max_line_bytes=4)
    assert s.feed(b"abcdefg") == []
    assert s.flush() == ["abcd …[cut 3 bytes]"]
    assert s.cut == 1


def test_cut_does_not_split_utf8_char() -> None:
    # "é" is 2 bytes; a cut at 5 would land inside the third é.
    s = LineSplitter(max_line_bytes=5)
    out = s.feed("ééééé\n".encode())
    assert out == ["éé …[cut 6 bytes]"]


def test_cut_does_not_split_utf8_char_across_chunks() -> None:
    s = LineSplitter(max_line_bytes=5)
    out = s.feed(b"abcd\xe2") + s.feed(b"\x9c\x93 tail\n")  # "abcd✓ tail"
    assert out == ["abcd …[cut 8 bytes]"]


def test_huge_line_without_newline_keeps_memory_bounded() -> None:
    s = LineSplitter(max_line_bytes=1024)
    block = b"z" * 65536
    for _ in range(160):  # 10 MiB
        assert s.feed(block) == []
        assert s.buffered <= 1024
    out = s.feed(b"\nafter\n")
    assert out == ["z" * 1024 + f" …[cut {160 * 65536 - 1024} bytes]", "after"]


def test_default_max_is_16_kib() -> None:
    s = LineSplitter()
    out = s.feed(b"a" * (MAX_LINE_BYTES + 100) + b"\n")
    assert out == ["a" * MAX_LINE_BYTES + " …[cut 100 bytes]"]


def test_fast_enough_for_100k_lines() -> None:
    data = b"".join(b"INFO 12-01 10:00:00 engine step %d took 12ms\n" % i for i in range(100_000))
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    s = LineSplitter()
    start = time.perf_counter()
    out = feed_all(s, chunks)
    elapsed = time.perf_counter() - start
    assert len(out) == 100_000
    assert out[-1] == "INFO 12-01 10:00:00 engine step 99999 took 12ms"
    assert elapsed < 1.0, elapsed


# --- properties ---------------------------------------------------------------------------------

# Text without line terminators; includes multi-byte characters, escapes and trailing spaces.
line_text = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
    max_size=40,
)
separators = st.sampled_from([b"\n", b"\r\n", b"\r"])


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(line_text, max_size=20),
    seps=st.lists(separators, min_size=20, max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    terminate_last=st.booleans(),
)
def test_any_chunking_gives_the_same_lines(
    lines: list[str], seps: list[bytes], cuts: list[int], terminate_last: bool
) -> None:
    encoded = [line.encode() for line in lines]
    data = b"".join(e + sep for e, sep in zip(encoded, seps))
    if encoded and not terminate_last:
        data = data[: len(data) - len(seps[len(encoded) - 1])]
    expected = [c for c in (clean_line(e) for e in encoded) if c]
    s = LineSplitter()
    assert feed_all(s, chunked(data, cuts)) == expected
    assert s.lines == len(expected)
    assert s.cut == 0


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=400),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    limit=st.integers(min_value=1, max_value=32),
)
def test_buffer_bounded_and_chunking_irrelevant_for_any_bytes(data: bytes, cuts: list[int], limit: int) -> None:
    whole = LineSplitter(max_line_bytes=limit)
    expected = feed_all(whole, [data])
    s = LineSplitter(max_line_bytes=limit)
    out: list[str] = []
    for chunk in chunked(data, cuts):
        out.extend(s.feed(chunk))
        assert s.buffered <= limit
    out.extend(s.flush())
    assert out == expected
    assert (s.lines, s.cut) == (whole.lines, whole.cut)
    for line in out:
        assert "\n" not in line and "\r" not in line and "\x1b" not in line
        assert line == line.rstrip()
