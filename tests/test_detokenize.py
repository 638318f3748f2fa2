"""TextStream against a literal oracle (decode everything, `find` every stop string), and the work it does
per token, counted rather than timed, on the stop strings a hostile client sends."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, pre_tokenizers
from tokenizers.models import BPE

from conftest import byte_tokenizer_files
from jaxkv.generate import detokenize
from jaxkv.generate.detokenize import TextStream
from jaxkv.tokenizer import Tokenizer

PIECES = ["a", "b", "ab", " ", "\n", "é", "€", "🎭", "日本"]  # whole characters of 1 to 4 UTF-8 bytes
STOP_CHARS = "ab é€🎭日\ufffd"


def oracle(decode, ids, stops) -> tuple[str, bool]:
    """The text ends before the first stop string to be completed; at a tie, before the one starting earliest."""
    text = decode(ids)
    hits = [(i + len(s), i) for s in stops if s and (i := text.find(s)) >= 0]
    return (text[:min(hits)[1]], True) if hits else (text, False)


def stream(decode, chunks, stops) -> tuple[TextStream, list[str]]:
    """Feed the chunks, then finish: the stream and every delta (the last one from the final add)."""
    text = TextStream(decode, stops)
    return text, [text.add(chunk) for chunk in chunks] + [text.add([], final=True)]


def check(decode, chunks, stops, valid_utf8: bool) -> None:
    ids = [i for chunk in chunks for i in chunk]
    text, deltas = stream(decode, chunks, stops)
    expected, stopped = oracle(decode, ids, stops)
    assert "".join(deltas) == expected == text.text and text.stopped == stopped
    if valid_utf8:  # an incomplete character is never sent, not even as U+FFFD
        assert not any("\ufffd" in d for d in deltas)
    emitted = ""
    for delta in deltas:
        emitted += delta
        assert not any(s and s in emitted for s in stops)


@st.composite
def stop_strings(draw, text: str) -> list[str]:
    """Short stops over a few characters (overlapping ones like "aaab", empty ones), substrings of each other
    and of the text, so that they match, nearly match and tie."""
    stops = draw(st.lists(st.text("ab", max_size=6) | st.text(STOP_CHARS, max_size=5), max_size=4))
    for source in [text, *stops]:
        if source and draw(st.booleans()):
            i = draw(st.integers(0, len(source) - 1))
            stops.append(source[i:draw(st.integers(i + 1, len(source)))])
    return draw(st.permutations(stops))


@st.composite
def chunked(draw, ids: list[int]) -> list[list[int]]:
    """One id per add (as the engine does), or random chunks, empty ones included."""
    if draw(st.booleans()):
        return [[i] for i in ids]
    cuts = sorted(draw(st.lists(st.integers(0, len(ids)), max_size=6)))
    return [ids[i:j] for i, j in zip([0, *cuts], [*cuts, len(ids)])]


# --- byte-level BPE: one id per byte, so characters split over ids all the time ------------------------------
@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory) -> Tokenizer:
    directory = tmp_path_factory.mktemp("bytes")
    byte_tokenizer_files(directory)
    return Tokenizer.load(directory)


@settings(deadline=None, max_examples=300)
@given(data=st.data(), arbitrary=st.booleans())
def test_byte_level_stream_matches_the_oracle(byte_tokenizer, data, arbitrary):
    """Any ids (invalid UTF-8, <s> and </s> too), or the bytes of whole characters."""
    ids = []
    for _ in range(data.draw(st.integers(0, 14))):
        if arbitrary and data.draw(st.booleans()):
            ids.append(data.draw(st.integers(0, byte_tokenizer.vocab_size - 1)))
        else:
            ids += byte_tokenizer.encode(data.draw(st.sampled_from(PIECES)), add_special_tokens=False)
    chunks = data.draw(chunked(ids))
    stops = data.draw(stop_strings(byte_tokenizer.decode(ids)))
    check(byte_tokenizer.decode, chunks, stops, valid_utf8=not arbitrary)


@pytest.mark.parametrize("text, stops, expected", [
    ("xaaaab", ["aaab"], "xa"),  # the automaton falls back rather than restarting
    ("abc", ["abc", "b"], "a"),  # "b" is completed first
    ("abcd", ["bc", "abc"], ""),  # both completed at "c": the one starting earliest
    ("abab", ["bab", "abab", "ba"], "a"),
    ("none", ["nonex", "x"], "none"),
])
def test_the_first_stop_string_completed_ends_the_text(byte_tokenizer, text, stops, expected):
    ids = byte_tokenizer.encode(text, add_special_tokens=False)
    text_stream, deltas = stream(byte_tokenizer.decode, [[i] for i in ids], stops)
    assert "".join(deltas) == expected and text_stream.stopped == (expected != text)


def test_text_is_held_back_only_while_it_could_become_a_stop_string(byte_tokenizer):
    a, b, c = (byte_tokenizer.encode(ch, add_special_tokens=False) for ch in "abc")
    text = TextStream(byte_tokenizer.decode, ["abx", "bb"])
    assert [text.add(a), text.add(b), text.add(c)] == ["", "", "abc"]
    assert [text.add(b), text.add(a)] == ["", "b"] and not text.stopped  # "a" might begin "abx"
    assert [text.add(b), text.add(b), text.add(c)] == ["", "a", ""] and text.stopped and text.text == "abcba"


# --- SentencePiece (Metaspace) vocabularies: a leading space is stripped, rare characters are byte tokens -------
SP_VOCAB = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)),
            "▁", "▁▁", "a", "b", "ab", "▁a", "▁ab", "é", "▁é", "日本", "▁日本"]
SP_DECODERS = {  # jaxkv's for GGUF llama vocabularies (tokenizer.py), and HF's newer Metaspace decoder
    "gguf": decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                               decoders.Strip(" ", 1, 0)]),
    "metaspace": decoders.Sequence([decoders.ByteFallback(),
                                    decoders.Metaspace("▁", prepend_scheme="first", split=False)]),
}


@pytest.fixture(scope="module", params=sorted(SP_DECODERS))
def sp_tokenizer(request) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(SP_VOCAB)}
    hf = HFTokenizer(BPE(vocab, [], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    hf.decoder = SP_DECODERS[request.param]
    hf.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(hf, bos_id=1, eos_ids=(2,))


def test_sentencepiece_decoders_strip_the_first_space_only(sp_tokenizer):
    """What the prefix window has to get right: decoding from the middle strips a space the whole text keeps."""
    ids = [SP_VOCAB.index(t) for t in ["▁a", "▁", "▁ab"]]
    assert sp_tokenizer.decode(ids) == "a  ab" and sp_tokenizer.decode(ids[1:]) == " ab"
    assert "".join(stream(sp_tokenizer.decode, [[i] for i in ids], ())[1]) == "a  ab"


@settings(deadline=None, max_examples=200)
@given(data=st.data())
def test_sentencepiece_stream_matches_the_oracle(sp_tokenizer, data):
    """Pieces, <s>/</s>, and characters outside the vocabulary as byte tokens. Only valid UTF-8 runs of byte
    tokens: ByteFallback decodes a run as a whole, so an invalid byte turns its whole run into U+FFFD, even the
    characters already sent."""
    pieces = [i for i, t in enumerate(SP_VOCAB) if not t.startswith("<0x")]
    ids = []
    for _ in range(data.draw(st.integers(0, 14))):
        if data.draw(st.booleans()):
            ids.append(data.draw(st.sampled_from(pieces)))
        else:
            ids += [SP_VOCAB.index(f"<0x{b:02X}>") for b in data.draw(st.sampled_from(PIECES)).encode()]
    chunks = data.draw(chunked(ids))
    stops = data.draw(stop_strings(sp_tokenizer.decode(ids)))
    check(sp_tokenizer.decode, chunks, stops, valid_utf8=True)


# --- work per token, counted ------------------------------------------------------------------------------
def counted(byte_tokenizer, monkeypatch):
    """Patch in counters: the number of ids in every decode call, and every character fed to a stop automaton."""
    windows, fed = [], [0]
    feed = detokenize._Kmp.feed

    def counting_feed(matcher, char):
        fed[0] += 1
        return feed(matcher, char)

    monkeypatch.setattr(detokenize._Kmp, "feed", counting_feed)

    def decode(ids):
        windows.append(len(ids))
        return byte_tokenizer.decode(ids)

    return windows, fed, decode


def test_work_per_token_does_not_grow_with_the_text(byte_tokenizer, monkeypatch):
    """2,000 tokens of "a" against 16 stops of 500 characters that match all but their last few characters."""
    windows, fed, decode = counted(byte_tokenizer, monkeypatch)
    stops = ["a" * (499 - i) + "b" + "a" * i for i in range(16)]
    text = TextStream(decode, stops)
    (a,) = byte_tokenizer.encode("a", add_special_tokens=False)
    deltas = [text.add([a]) for _ in range(2000)] + [text.add([], final=True)]
    assert "".join(deltas) == "a" * 2000 and not text.stopped
    assert deltas[:499] == [""] * 499 and deltas[499:2000] == ["a"] * 1501  # 499 "a"s could become a stop
    assert max(windows) <= 2 and fed[0] == 2000 * 16  # each character through each automaton once
    assert sum(len(m.fail) for m in text.matchers) <= 16 * 500


def test_many_long_stop_strings_cost_what_the_text_is_long(byte_tokenizer, monkeypatch):
    """The request that took 58 s: 500 stops of 3,000 characters, 400 tokens. Before, every token decoded all
    ids, searched the text 500 times and ran 500 x 3,000 `startswith`: some 6e8 calls. Now the work is the
    decoded ids, the characters fed and the prefix-function entries built; here all 500 automata climb with the
    text, the worst case, and the total stays under 1e6 simple steps, well under a second of CPU."""
    windows, fed, decode = counted(byte_tokenizer, monkeypatch)
    stops = ["a" * 2999 + chr(0x100 + i) for i in range(500)]
    text = TextStream(decode, stops)
    (a,) = byte_tokenizer.encode("a", add_special_tokens=False)
    deltas = [text.add([a]) for _ in range(400)] + [text.add([], final=True)]
    assert "".join(deltas) == "a" * 400 and deltas[:400] == [""] * 400
    table = sum(len(m.fail) for m in text.matchers)
    assert fed[0] == 400 * 500 and table <= 401 * 500 and max(windows) <= 2
    assert sum(windows) + fed[0] + table < 1_000_000


# --- the real SmolLM2 vocabulary -------------------------------------------------------------------------------
@pytest.mark.slow
def test_text_stream_never_emits_half_characters_or_stop_strings(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    text = "Café 🎭 naïve — “quoted” 日本語 end"
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer.decode)
    deltas = [stream.add([i]) for i in ids] + [stream.add([], final=True)]
    assert "".join(deltas) == tokenizer.decode(ids) and not any("\ufffd" in d for d in deltas)
    assert any(d == "" for d in deltas)  # the emoji and CJK bytes arrive over several tokens

    stream = TextStream(tokenizer.decode, stop=("quoted”",))
    deltas = [stream.add([i]) for i in ids]
    assert stream.stopped and "".join(deltas) == text[:text.find("quoted”")]
    assert not any("quot" in d for d in deltas)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_checkpoint) -> Tokenizer:
    return Tokenizer.load(smollm2_checkpoint)


@pytest.mark.slow
@settings(deadline=None, max_examples=100)
@given(data=st.data())
def test_smollm2_stream_matches_decoding_everything(smollm2_tokenizer, data):
    """Random ids of the real vocabulary: multi-byte tokens that start or end inside characters, special ids."""
    tokenizer = smollm2_tokenizer
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=24))
    check(tokenizer.decode, data.draw(chunked(ids)), data.draw(stop_strings(tokenizer.decode(ids))),
          valid_utf8=False)
