"""jaxkv.Tokenizer against transformers: ids, decoding and chat prompts of the real SmolLM2 GGUF,
of synthetic GGUF vocabularies (byte-level and SentencePiece), and the HF file layout."""

from __future__ import annotations

import json

import gguf
import pytest
import tokenizers
from tokenizers import pre_tokenizers

from jaxkv.errors import JaxkvError
from jaxkv.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "12345",
    "Pi is 3.14159, e is 2.71828 and 1/3 = 0.333",
    "  two leading spaces",
    "trailing spaces   ",
    "many     inner   spaces",
    "line one\nline two\n\n\nline five\r\nwindows",
    "\ttab\tseparated\tvalues",
    "def square(x):\n    return x ** 2  # comment\n",
    "naïve café Straße — 日本語のテキスト",
    "emoji 🙂🚀 and a flag 🇫🇷",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>raw<file_sep>tokens",
    "don't won't I'm we'll they've",
    "",
]
# Whitespace runs before digits: where SmolLM2's Digits pre-tokenizer shows (see the test below).
SPACED_DIGITS = ["x  1", "col    42", "row:\n    12", "a\t\t3.5"]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a colour."}],
]


def hf_gguf_tokenizer(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def hf_ids(hf, text: str) -> list[int]:
    return hf(text)["input_ids"]


# --- the real SmolLM2 GGUF ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_reader(smollm2_gguf) -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm2_gguf)


@pytest.fixture(scope="module")
def jx(smollm2_reader) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_reader)


@pytest.fixture(scope="module")
def hf(smollm2_gguf):
    return hf_gguf_tokenizer(smollm2_gguf)


@pytest.mark.slow
def test_ids_match_transformers(jx, hf):
    for text in TEXTS:
        assert jx.encode(text) == hf_ids(hf, text), text
        assert jx.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text
    assert jx.encode("<|im_start|>user") == [1, 4093]


@pytest.mark.slow
def test_digits_are_isolated_like_original_smollm2(jx, hf):
    """SmolLM2's tokenizer.json pre-tokenizes with Sequence[Digits(individual_digits=True), ByteLevel]
    (llama.cpp's "smollm": a \\p{N} split, then GPT-2's regex). transformers' GGUF converter drops the
    Digits step, which changes ids only where whitespace runs precede a digit ("x  1" -> x,Ġ,Ġ,1
    instead of x,ĠĠ,1), so the reference here is transformers' vocabulary with the original pre-tokenizer."""
    reference = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    for text in SPACED_DIGITS + TEXTS:
        assert jx.encode(text) == reference.encode(text).ids, text
    assert [jx.hf.id_to_token(i) for i in jx.encode("x  1")] == ["x", "ĠĠ", "1"]


@pytest.mark.slow
def test_decode(jx, hf):
    for text in TEXTS + SPACED_DIGITS:
        ids = jx.encode(text)
        assert jx.decode(ids, skip_special_tokens=False) == text
        assert jx.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    assert jx.decode(jx.encode("<|im_start|>hi<|im_end|>")) == "hi"


@pytest.mark.slow
def test_special_tokens(jx, hf):
    assert (jx.bos_id, jx.eos_ids, jx.bos_token, jx.eos_token) == (1, (2,), hf.bos_token, hf.eos_token)
    assert jx.vocab_size == len(hf) == 49152
    assert not jx.add_bos  # tokenizer.ggml.add_bos_token is false for SmolLM2


@pytest.mark.slow
def test_chat_template_matches_transformers(jx, hf):
    for conversation in CONVERSATIONS:
        want = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert jx.apply_chat_template(conversation) == want
        assert jx.apply_chat_template(conversation, add_generation_prompt=False) == \
            hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
    assert jx.apply_chat_template("Hi there!") == jx.apply_chat_template(CONVERSATIONS[0])


@pytest.mark.slow
def test_save_load_round_trip(jx, tmp_path):
    jx.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    for text in TEXTS + SPACED_DIGITS:
        assert back.encode(text) == jx.encode(text), text
    assert (back.bos_id, back.eos_ids, back.chat_template, back.add_bos) == \
        (jx.bos_id, jx.eos_ids, jx.chat_template, jx.add_bos)
    # The files are HF's layout: transformers reads them to the same ids and prompts.
    transformers = pytest.importorskip("transformers")
    hf_saved = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + SPACED_DIGITS:
        assert hf_ids(hf_saved, text) == jx.encode(text), text
    assert hf_saved.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True) == \
        jx.apply_chat_template(CONVERSATIONS[1])


# --- synthetic GGUF vocabularies -------------------------------------------------------------------------

def write_tokenizer_gguf(path, *, model: str, tokens, types, merges=None, scores=None, pre=None,
                         add_bos=None, bos=1, eos=2, eot=None, template=None):
    """A tensor-less llama GGUF carrying only tokenizer metadata, as llama.cpp names it."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    if eot is not None:
        w.add_eot_token_id(eot)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if template is not None:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def smollm2_subset(reader: gguf.GGUFReader, n: int = 4000):
    """The first n SmolLM2 tokens and the merges that build them: a consistent, smaller byte-level BPE."""
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()[:n]
    types = reader.get_field("tokenizer.ggml.token_type").contents()[:n]
    known = set(tokens)
    merges = [m for m in reader.get_field("tokenizer.ggml.merges").contents()
              if (parts := m.split(" ")) and parts[0] in known and parts[1] in known and "".join(parts) in known]
    return tokens, types, merges


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["gpt2", "default", "llama-bpe", "qwen2"])
def test_byte_level_pre_types_match_transformers(smollm2_reader, tmp_path, pre):
    tokens, types, merges = smollm2_subset(smollm2_reader)
    path = write_tokenizer_gguf(tmp_path / "tok.gguf", model="gpt2", tokens=tokens, types=types, merges=merges,
                                pre=pre, add_bos=True, eot=0)
    jx = Tokenizer.from_gguf(gguf.GGUFReader(path))
    hf = hf_gguf_tokenizer(path).backend_tokenizer
    if pre == "llama-bpe":
        hf.model.ignore_merges = True  # as Llama 3's tokenizer.json (and llama.cpp) have it
    for text in TEXTS + SPACED_DIGITS:
        ids = jx.encode(text)
        assert ids == hf.encode(text).ids, text
        assert ids == [1, *jx.encode(text, add_special_tokens=False)]  # BOS, because the file says so
        assert jx.decode(ids) == hf.decode(ids), text
    assert jx.eos_ids == (2, 0) and jx.add_bos


SPM_PIECES = ["▁", "t", "h", "e", "l", "o", "w", "r", "d", "a", "n", "i", "g", "s", ",", "!",
              "he", "▁t", "▁th", "▁the", "ll", "llo", "▁he", "▁hello", "or", "▁w", "▁wor", "ld",
              "▁world", "in", "ing", "▁thing", "an", "▁a", "▁an", "▁and", "▁▁"]
SPM_TEXTS = ["hello world", "the thing and hello", "  two spaces", "héllo wörld! 🙂", "tab\tnew\nline",
             "<s>hello</s>", ""]


@pytest.mark.slow
def test_sentencepiece_matches_transformers(tmp_path):
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SPM_PIECES]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))]
    path = write_tokenizer_gguf(tmp_path / "spm.gguf", model="llama", tokens=tokens, types=types, scores=scores)
    jx = Tokenizer.from_gguf(gguf.GGUFReader(path))
    hf = hf_gguf_tokenizer(path)
    assert jx.add_bos  # SentencePiece files that do not say add BOS
    for text in SPM_TEXTS:
        ids = jx.encode(text)
        assert ids == hf_ids(hf, text), text
        assert jx.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    assert [jx.hf.id_to_token(i) for i in jx.encode("hello world")] == ["<s>", "▁hello", "▁world"]


def test_unsupported_gguf_tokenizers(tmp_path):
    common = dict(tokens=["a", "b", "ab"], types=[1, 1, 1], merges=["a b"])
    bert = write_tokenizer_gguf(tmp_path / "bert.gguf", model="bert", **common)
    with pytest.raises(JaxkvError, match="'bert'"):
        Tokenizer.from_gguf(gguf.GGUFReader(bert))
    odd = write_tokenizer_gguf(tmp_path / "pre.gguf", model="gpt2", pre="made-up", **common)
    with pytest.raises(JaxkvError, match="'made-up'"):
        Tokenizer.from_gguf(gguf.GGUFReader(odd))


# --- HF model directories ---------------------------------------------------------------------------

WORDS = ["<unk>", "<s>", "</s>", "<eot>", "hello", "world", "user", "assistant", ":"]


def write_hf_dir(directory, config: dict, *, bos_processor: bool = False, generation: dict | None = None):
    """A word-level tokenizer.json (optionally adding <s> itself) and the given tokenizer_config.json."""
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>", "<eot>"])
    if bos_processor:
        tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory.mkdir(exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


def test_load_hf_dir(tmp_path):
    config = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>", "add_bos_token": True,
              "chat_template": "ignored: chat_template.jinja wins"}
    directory = write_hf_dir(tmp_path / "m", config, generation={"eos_token_id": [2, 3]})
    (directory / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}")
    tok = Tokenizer.load(directory)
    assert (tok.bos_id, tok.eos_ids, tok.bos_token, tok.eos_token) == (1, (2, 3), "<s>", "</s>")
    assert tok.encode("hello world") == [1, 4, 5]  # add_bos_token: true adds the post-processor tokenizer.json lacks
    assert tok.encode("hello world", add_special_tokens=False) == [4, 5]
    prompt = tok.apply_chat_template("hello")
    assert prompt == "<s>user : hello </s> assistant :"
    assert tok.encode(prompt, add_special_tokens=False) == [1, 6, 8, 4, 2, 7, 8]
    assert tok.decode([1, 4, 2, 5]) == "hello world"
    assert tok.vocab_size == len(WORDS)


def test_load_hf_dir_flags_and_generation_eos(tmp_path):
    # tokenizer.json adds BOS but the config says not to: the explicit flag wins, as in transformers.
    off = Tokenizer.load(write_hf_dir(tmp_path / "off", {"bos_token": "<s>", "eos_token": "</s>",
                                                          "add_bos_token": False}, bos_processor=True))
    assert off.encode("hello") == [4] and not off.add_bos
    # No flag: the post-processor decides. A single generation_config eos id is an int.
    on = Tokenizer.load(write_hf_dir(tmp_path / "on", {"bos_token": "<s>", "eos_token": "</s>"},
                                     bos_processor=True, generation={"eos_token_id": 3}))
    assert on.encode("hello") == [1, 4] and on.add_bos and on.eos_ids == (2, 3)
    assert on.chat_template is None


def test_save_load_multi_eos(tmp_path):
    tok = Tokenizer.load(write_hf_dir(tmp_path / "m", {"bos_token": "<s>", "eos_token": "</s>",
                                                        "chat_template": "{{ messages[0]['content'] }}"},
                                      generation={"eos_token_id": [2, 3]}))
    tok.save(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert saved["eos_token_ids"] == [2, 3] and saved["add_bos_token"] is False
    back = Tokenizer.load(tmp_path / "saved")
    assert (back.eos_ids, back.bos_id, back.chat_template) == ((2, 3), 1, tok.chat_template)


def test_chat_template_errors(tmp_path):
    no_template = Tokenizer.load(write_hf_dir(tmp_path / "a", {"eos_token": "</s>"}))
    with pytest.raises(JaxkvError, match="^model has no chat template$"):
        no_template.apply_chat_template("hi")
    strict = Tokenizer.load(write_hf_dir(tmp_path / "b", {
        "chat_template": "{% if messages[0]['role'] != 'system' %}{{ raise_exception('needs a system turn') }}"
                         "{% endif %}"}))
    with pytest.raises(JaxkvError, match="needs a system turn"):
        strict.apply_chat_template("hi")


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(JaxkvError, match=f"^no tokenizer.json in {tmp_path}$"):
        Tokenizer.load(tmp_path)
