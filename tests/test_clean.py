"""The Arrow cleaning, segmentation and word splitting equal the plain-Python reference
(tests/reference.py) and the tokenizer library's own normalizer and pre-tokenizer, on texts
built to hit every rule, and on random texts drawn from the characters where the two worlds
disagree (Unicode spaces and line breaks, case, compatibility forms, marks, jamo, emoji)."""

import random
import sys

import pyarrow as pa
import pytest
from tokenizers.models import WordLevel

from raydiff.config import load_config
from raydiff.data.clean import article_segments
from raydiff.data.tokenizer import UNK, word_pipeline
from raydiff.data.unicode import PY_SPACE, CharTables
from raydiff.data.words import split_words
from tests import reference

HOSTILE = [
    "Profits &amp; losses <b>rose</b> at <IBM>.\n\n  Shares   fell. Analysts  said so.\nok",
    "before <a\nhref='x'>link</a> after the words here. And <A&B.C-D> too.",
    "<TOO-LONG-TICKER-NAME-HERE> stays; <" + "x" * 250 + "> stays too, longer than a tag.",
    "crlf\r\nline two\rline three\x0bfour\x0cfive\x1csix\x1dseven\x1eeight\x85nine",
    "u2028\u2028para\u2029end with\x1fcontrol\u1680ogham\u202fnarrow\u3000ideographic",
    "zero\u200bwidth and\u00a0nbsp\tand\u2003em spaces. Next sentence here.",
    "İstanbul ΣΊΣΥΦΟΣ ΟΔΟΣ. Straße ǅemal ǈ. Ｆｕｌｌｗｉｄｔｈ ﬁne ﬂow Ⅻ ①.",
    "café vs cafe\u0301, naïve coöperation, ÅNGSTRÖM.",
    "emoji 😀 and 👩\u200d💻 stay. CJK 漢字 text. Hangul 한국어 and jamo \u1100\u1161\u11a8.",
    "He left. She stayed! Why? 3 men came. 'Quoted' start. (Paren) here. [Bracket] there.",
    "\"Double\" quotes. «Guillemets» work? ¿Qué? ¡Sí! done.",
    "Literal [PAD] and [UNK] and ［PAD］ tokens, [pad] lower.",
    "&#8217;curly&#x2019; &nbsp;space &lt;tag&gt; &copy; 2024 &amp;amp; &bogus; &#0;",
    "numbers 3.5 pct, $1,200.50, 10-K filing; e-mail a@b.com http://x.y/z?q=1",
    "   \n\n\t  \n",
    "one",
    "a b",
    "Reuters reported it. Copyright 2024 Reuters\nkept line here",
]
CONFIGS = [
    [],
    ["data.lowercase=false"],
    ["data.remove_tickers=false", "data.min_words=1"],
    ["data.pack=true", "data.seq_len=8"],
    ["data.boilerplate_patterns=[Reuters, '^Copyright.*$']", "data.max_words=6"],
]

# characters where Python, RE2/Arrow and the tokenizer's Rust code are most likely to differ
POOL = (list("abcXYZ019 .,!?'\"()[]<>&;:-_/\n\t") + [chr(c) for c in PY_SPACE]
        + list("İıΣσςǅﬁﬂⅫ①ＡＢａｂ１ßẞÅÅ\u0301\u0308\u200b\u200c\u200d\u1100\u1161\u11a8가😀👍🏽漢"
               "\u00ad\ufeff\x00\x7f\u0130\u03a3\u1e9e\ufb01\U0001d400\U0002f800\U000e0041"))


def _cfg(extra):
    return load_config(None, extra).data


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = [rng.choice(POOL) if rng.random() < 0.7 else chr(rng.randrange(0x20, 0x30000))
                 for _ in range(rng.randint(1, 80))]
        out.append("".join(c for c in chars if not 0xD800 <= ord(c) <= 0xDFFF))
    return out


@pytest.mark.parametrize("extra", CONFIGS, ids=lambda e: " ".join(e) or "default")
def test_segments_equal_the_python_reference(extra):
    cfg = _cfg(extra)
    texts = HOSTILE + _random_texts(3000, seed=len(extra))
    segments, article = article_segments(texts, cfg, CharTables.build(cfg.lowercase, cfg.pack))
    expected = [(i, s) for i, t in enumerate(texts) for s in reference.article_segments(t, cfg)]
    assert list(zip(article.tolist(), segments.to_pylist(), strict=True)) == expected


@pytest.mark.parametrize("lowercase", [True, False])
def test_words_equal_the_tokenizers_normalizer_and_pre_tokenizer(lowercase):
    cfg = _cfg([f"data.lowercase={lowercase}", "data.min_words=1"])
    texts = HOSTILE + _random_texts(3000, seed=7)
    tables = CharTables.build(lowercase, False)
    segments = article_segments(texts, cfg, tables)[0].to_pylist() + _random_texts(2000, seed=8)
    words = split_words(pa.array(segments, pa.string()), tables).to_pylist()
    tok = word_pipeline(WordLevel(unk_token=UNK), lowercase)
    library = [[w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(s))]
               for s in segments]
    assert words == library
    assert words == reference.word_tokens(segments, lowercase)


def test_python_whitespace_table_covers_every_code_point():
    assert tuple(c for c in range(sys.maxunicode + 1)
                             if not 0xD800 <= c <= 0xDFFF and chr(c).isspace()) == PY_SPACE


def test_tables_are_built_once_and_travel_as_plain_patterns():
    import pickle

    tables = CharTables.build(True, True)
    size = len(pickle.dumps(tables))
    assert size < 200_000  # sent to every worker with the stages
    assert pickle.loads(pickle.dumps(tables)) == tables


def test_cached_tables_equal_freshly_built_ones(tmp_path, monkeypatch):
    from raydiff.data import unicode

    monkeypatch.setenv("RAYDIFF_CACHE", str(tmp_path))
    built = CharTables.build(True, True)
    assert len(list(tmp_path.glob("chartables-*.json"))) == 1
    monkeypatch.setattr(unicode, "tokenizer_classes", None)  # a cache hit builds nothing
    assert CharTables.build(True, True) == built
    (next(tmp_path.glob("chartables-*.json"))).write_text("{not json")
    monkeypatch.undo()
    monkeypatch.setenv("RAYDIFF_CACHE", str(tmp_path))
    assert CharTables.build(True, True) == built  # a damaged cache is rebuilt


def test_text_of_characters_that_are_their_own_nfkc_is_its_own_nfkc():
    """What lets `split_words` skip normalizing a segment without an UNVERIFIED character (one
    that NFKC changes alone, a mark, a jamo, an unassigned code point): NFKC could still change
    such a string only by reordering characters of a non-zero combining class, or by composing
    a character with the next one. Every character of the first kind is a mark; every second
    character of a canonical composition is a mark or a conjoining jamo."""
    import unicodedata

    def jamo(c: int) -> bool:
        return 0x1100 <= c <= 0x11FF or 0x3130 <= c <= 0x318F or 0xA960 <= c <= 0xA97F \
            or 0xD7B0 <= c <= 0xD7FF

    chars = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    reordered = [c for c in chars if unicodedata.combining(c)]
    assert reordered and all(unicodedata.category(c)[0] == "M" for c in reordered)
    # canonical pairs from the decomposition table (Hangul composes by rule: jamo with jamo)
    seconds = {int(d[1], 16) for c in chars
               if len(d := unicodedata.decomposition(c).split()) == 2 and not d[0].startswith("<")}
    assert seconds and all(unicodedata.category(chr(c))[0] == "M" or jamo(c) for c in seconds)
