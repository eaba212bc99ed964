from __future__ import annotations

from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sgl_engine.detokenizer import IncrementalDetokenizer, StopMatcher
from sgl_engine.testing import make_tiny_tokenizer

FFFD = "\ufffd"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "你好🙂",
    "  leading spaces, éàü and 中文字符 🎉🙂👍 mixed\nwith newlines\t\ttabs",
    '{"name": "Alice", "emoji": "🙂🙂🙂"}',
    "🙂",
    "",
]
ALPHABET = st.sampled_from(
    list("ab cd.,\n:{}\"'é") + ["你", "好", "中", "文", "🙂", "🎉", "👍", "ü"]
)


@cache
def tokenizer():
    return make_tiny_tokenizer()


@cache
def metaspace_tokenizer():
    """A SentencePiece-style tokenizer: decoding a lone '▁world' drops its leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"], show_progress=False)
    tok.train_from_iterator(["hello world, hello there world"] * 10, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def stream(detok: IncrementalDetokenizer, ids: list[int], chunks: list[int] | None = None):
    """Feed ids in the given chunk sizes (one at a time by default); returns the deltas."""
    deltas, pos = [], 0
    for size in chunks or [1] * len(ids):
        deltas.append(detok.add(ids[pos : pos + size]))
        pos += size
    if pos < len(ids):
        deltas.append(detok.add(ids[pos:]))
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_full_decode(text):
    tok = tokenizer()
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = stream(detok, ids)
    assert not any(FFFD in d for d in deltas)
    assert detok.flush() == ""
    assert "".join(deltas) == detok.text == tok.decode(ids) == text


def test_multibyte_characters_really_split_across_tokens():
    tok = tokenizer()
    ids = tok.encode("你好🙂")
    assert len(ids) > 3
    assert any(FFFD in tok.decode([i]) for i in ids)


def test_partial_character_held_back_until_resolved_or_flushed():
    tok = tokenizer()
    ids = tok.encode("a🙂")
    pieces = [tok.decode(ids[:k]) for k in range(1, len(ids) + 1)]
    assert pieces[-2].endswith(FFFD)
    detok = IncrementalDetokenizer(tok)
    deltas = stream(detok, ids)
    assert deltas[-1].endswith("🙂") and not any(FFFD in d for d in deltas)

    cut = IncrementalDetokenizer(tok)
    assert "".join(stream(cut, ids[:-1])) == "a"
    assert cut.text == "a"
    tail = cut.flush()
    assert tail.endswith(FFFD)
    assert cut.text == tok.decode(ids[:-1])
    assert cut.flush() == ""


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(skip):
    tok = tokenizer()
    ids = tok.encode("hi<|im_end|>there<|im_start|>")
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    out = "".join(stream(detok, ids)) + detok.flush()
    assert out == tok.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in out) is not skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(ALPHABET, max_size=40), st.data())
def test_random_text_random_chunks(text, data):
    tok = tokenizer()
    ids = tok.encode(text)
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=len(ids)))
    detok = IncrementalDetokenizer(tok)
    deltas = stream(detok, ids, chunks)
    assert not any(FFFD in d for d in deltas)
    assert "".join(deltas) + detok.flush() == tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.text(ALPHABET, max_size=20), st.text(ALPHABET, max_size=20))
def test_prompt_context(prompt, output):
    tok = tokenizer()
    prompt_ids, output_ids = tok.encode(prompt), tok.encode(output)
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt_ids)
    deltas = stream(detok, output_ids)
    assert not any(FFFD in d for d in deltas)
    assert "".join(deltas) + detok.flush() == output


def test_prompt_context_restores_leading_space():
    tok = metaspace_tokenizer()
    prompt_ids = tok.encode("hello")
    full = tok.encode("hello world")
    assert full[: len(prompt_ids)] == prompt_ids
    output_ids = full[len(prompt_ids) :]
    assert tok.decode(output_ids) == "world"
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt_ids)
    out = "".join(stream(detok, output_ids)) + detok.flush()
    assert out == tok.decode(full)[len(tok.decode(prompt_ids)) :] == " world"
    without = IncrementalDetokenizer(tok)
    assert "".join(stream(without, output_ids)) == "world"


def brute_find(stops, text, start):
    lo = max(0, start - max(map(len, stops), default=0) + 1)
    hits = [(i, s) for s in stops for i in range(lo, len(text)) if text.startswith(s, i)]
    return min(hits, key=lambda hit: (hit[0], len(hit[1])), default=None)


def brute_safe_len(stops, text):
    for i in range(len(text) + 1):
        rest = text[i:]
        if any(s.startswith(rest) or rest.startswith(s) for s in stops):
            return i
    return len(text)


SMALL = st.sampled_from(list("abc🙂"))


@given(
    st.lists(st.text(SMALL, min_size=1, max_size=4), max_size=4),
    st.text(SMALL, max_size=30),
    st.integers(0, 35),
)
def test_find_and_safe_len_match_brute_force(stops, text, start):
    matcher = StopMatcher(stops)
    assert matcher.find(text, start) == brute_find(stops, text, start)
    assert matcher.safe_len(text) == (brute_safe_len(stops, text) if stops else len(text))


def test_find_examples():
    matcher = StopMatcher(["abc", "ab", "xyz"])
    assert matcher.find("zzabcz") == (2, "ab")
    assert matcher.find("zzxyz abc", start=8) == (6, "ab")
    assert matcher.find("xyz......", start=9) is None
    assert matcher.safe_len("hello a") == 6
    assert matcher.safe_len("hello xy") == 6
    assert matcher.safe_len("hello x ab") == 8
    assert StopMatcher([]).find("anything") is None
    assert not StopMatcher([])
    with pytest.raises(ValueError):
        StopMatcher([""])


def run_stream(text_ids: list[int], stops: list[str], chunks: list[int] | None = None):
    """The engine's loop: detokenize, search only the new tail, stream up to safe_len."""
    tok = tokenizer()
    detok, matcher = IncrementalDetokenizer(tok), StopMatcher(stops)
    streamed, searched, found = "", 0, None
    sizes = chunks or [1] * len(text_ids)
    sizes = sizes + [len(text_ids) - sum(sizes)] if sum(sizes) < len(text_ids) else sizes
    pos = 0
    for size in sizes:
        detok.add(text_ids[pos : pos + size])
        pos += size
        text = detok.text
        found = matcher.find(text, searched)
        searched = len(text)
        if found:
            return text[: found[0]], streamed, found
        safe = text[: matcher.safe_len(text)]
        assert safe.startswith(streamed)
        streamed = safe
    detok.flush()
    return detok.text, streamed, None


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("Answer: Paris. Question: What", "Paris. Q", "Answer: "),
        ("Say 你好🙂 then stop", "好🙂", "Say 你"),
        ("Say 你好🙂 then stop", "🙂 t", "Say 你好"),
        ('{"name": "Alice"} trailing', "} t", '{"name": "Alice"'),
    ],
)
def test_stop_spanning_token_boundaries(text, stop, expected):
    tok = tokenizer()
    ids = tok.encode(text)
    assert not any(stop in tok.decode([i]) for i in ids)
    out, streamed, found = run_stream(ids, [stop, "never-there"])
    assert found == (len(expected), stop)
    assert out == expected
    assert expected.startswith(streamed)


@settings(max_examples=150, deadline=None)
@given(st.text(ALPHABET, min_size=1, max_size=30), st.data())
def test_streaming_never_leaks_a_stop(text, data):
    tok = tokenizer()
    ids = tok.encode(text)
    stops = data.draw(
        st.lists(
            st.one_of(
                st.text(ALPHABET, min_size=1, max_size=3),
                st.integers(0, len(text) - 1).flatmap(
                    lambda i: st.integers(i + 1, min(len(text), i + 4)).map(lambda j: text[i:j])
                ),
            ),
            min_size=1,
            max_size=3,
        )
    )
    chunks = data.draw(st.lists(st.integers(1, 3), max_size=len(ids)))
    out, streamed, found = run_stream(ids, stops, chunks)
    assert out.startswith(streamed)
    assert not any(s in out for s in stops)
    if found is None:
        assert out == text
    else:
        assert text.startswith(out + found[1])


def test_stop_regex_finds_the_first_match_and_holds_back_partial_matches():
    m = StopMatcher((), [r"\d+\.", r"END"])
    assert m and m.find("abc 12. x") == (4, "12.")
    assert m.find("no match") is None
    assert m.safe_len("value 12") == len("value ")  # "12" may still become "12."
    assert m.safe_len("see EN") == len("see ")
    assert m.safe_len("plain text") == len("plain text")
    both = StopMatcher(["STOP"], [r"x{2}"])
    assert both.find("aaxx STOP") == (2, "xx")
    assert both.find("a STOP xx") == (2, "STOP")


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="ab1.", max_size=30))
def test_streamed_prefix_never_contains_a_stop_regex_match(text):
    m = StopMatcher((), [r"1\.", r"bb"])
    for end in range(len(text) + 1):
        shown = text[: m.safe_len(text[:end])]
        found = m.find(shown)
        assert found is None
