"""`runs`: character classes of UTF-8 bytes and maximal runs of them, against Python's own view of
the same strings (code points, `str.split`, a regex over the characters)."""

import random
import re

import numpy as np
import pyarrow as pa
import pytest

from raydiff.data.runs import byte_classes, count_runs, split_runs, utf8_view
from raydiff.data.unicode import PY_SPACE, WORD, py_pieces_table

# one to four UTF-8 bytes, Python's whitespace, code points past any small table
ALPHABET = (list("ab1 .,\t\n") + [chr(c) for c in PY_SPACE]
            + ["é", "ß", "Σ", "€", "漢", "가", "\u200b", "😀", "\U0002f800", "\U0010fffd"])


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 30))) for _ in range(n)]


def _table(size: int = 0x3001, seed: int = 0) -> np.ndarray:
    """Classes 0-3 at random, so that runs of different classes meet."""
    return np.random.default_rng(seed).integers(0, 4, size).astype(np.uint8)


def test_utf8_view_reads_sliced_chunked_and_large_strings_without_nulls():
    texts = _texts(50, seed=1)
    for strings in (pa.array(texts).slice(7, 30), pa.chunked_array([texts[:20], texts[20:]]),
                    pa.array(texts, pa.large_string()), pa.array([], pa.string())):
        data, offsets = utf8_view(strings)
        expected = strings.to_pylist()
        pieces = zip(offsets[:-1], offsets[1:], strict=True)
        assert [bytes(data[a:b]).decode() for a, b in pieces] == expected
    with pytest.raises(ValueError, match="null"):
        utf8_view(pa.array(["a", None]))


def test_every_byte_takes_the_class_of_its_character():
    texts = _texts(300, seed=2)
    table, beyond = _table(), 7
    data, _ = utf8_view(pa.array(texts))
    expected = [table[ord(c)] if ord(c) < len(table) else beyond
                for c in "".join(texts) for _ in c.encode()]
    assert byte_classes(data, table, beyond).tolist() == expected


@pytest.mark.parametrize("seed", [3, 4])
def test_runs_count_the_pieces_str_split_makes(seed):
    texts = _texts(2000, seed) + ["", " ", "a", " a  b ", "\u3000x\u3000"]
    assert count_runs(pa.array(texts), py_pieces_table(), WORD).tolist() == \
        [len(t.split()) for t in texts]


def test_split_runs_gives_each_strings_maximal_runs_of_one_class():
    texts = _texts(1000, seed=5)
    table, beyond = _table(seed=6), 2
    strings = pa.array(texts).slice(3)  # offsets that do not start at 0
    data, offsets = utf8_view(strings)
    got = split_runs(data, offsets, byte_classes(data, table, beyond)).to_pylist()

    def cls(c: str) -> int:
        return int(table[ord(c)]) if ord(c) < len(table) else beyond

    expected = []
    for text in texts[3:]:
        runs = [m.group() for m in re.finditer(r"(.)\1*", "".join(str(cls(c)) for c in text),
                                               re.DOTALL)]
        pieces, start = [], 0
        for run in runs:
            if run[0] != "0":
                pieces.append(text[start:start + len(run)])
            start += len(run)
        expected.append(pieces)
    assert got == expected
