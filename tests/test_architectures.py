"""Every supported family against transformers on tiny random models that transformers writes: all-position
logits through the dense cache, greedy continuations through the paged engine, and one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import jaxkv
from conftest import TINY_FAMILIES, relative_error, write_tiny_hf_model
from jaxkv.cache.dense import KVCache
from jaxkv.errors import JaxkvError
from jaxkv.generate.sampling import SamplingParams
from jaxkv.model.decoder import forward


def _hf_greedy(hf_model, prompt_ids, n):
    with torch.no_grad():
        return hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0)[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module", params=sorted(TINY_FAMILIES))
def family_model(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, write_tiny_hf_model(directory, request.param), jaxkv.load(str(directory))


def test_logits_match_transformers(family_model):
    family, hf_model, llm = family_model
    tokens = np.random.default_rng(0).integers(0, 256, size=(2, 40))
    with torch.no_grad():
        want = hf_model(torch.tensor(tokens)).logits.numpy()
    got, _ = forward(llm.config, llm.params, tokens, KVCache.init(llm.config, 2, 64))
    assert relative_error(got[:, -1], want[:, -1]) < 1e-4, f"{family}: last-position logits differ"
    assert relative_error(got, want) < 1e-4, f"{family}: logits differ"


WINDOWED = ("mistral", "qwen2-window", "gemma2", "gemma3")  # the logits test covers the rest's layers


@pytest.mark.parametrize("family_model", WINDOWED, indirect=True)
def test_greedy_continuation_matches_transformers(family_model):
    """16 greedy tokens after a prompt longer than the window, through the paged engine (prefill in chunks), for
    the families whose attention differs on pages (windows, soft-caps, local RoPE)."""
    family, hf_model, llm = family_model
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, 256, size=21)]
    got = llm.generate_ids([prompt], 16, SamplingParams(), ignore_eos=True)[0].token_ids
    assert got == _hf_greedy(hf_model, prompt, 16), f"{family}: greedy tokens differ"


def _config(tmp_path, family="llama-bias", **changes):
    write_tiny_hf_model(tmp_path, family)
    data = json.loads((tmp_path / "config.json").read_text())
    data.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(data))
    return tmp_path


@pytest.mark.parametrize("changes, named", [
    (dict(architectures=["GPTNeoXForCausalLM"]), "GPTNeoXForCausalLM"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}), "yarn"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(layer_types=["full_attention", "chunked_attention", "full_attention"]), "layer_types"),
])
def test_fields_jaxkv_cannot_honour_are_one_line_errors(tmp_path, changes, named):
    with pytest.raises(JaxkvError) as info:
        jaxkv.load(str(_config(tmp_path, **changes)))
    message = str(info.value)
    assert named in message and "\n" not in message, message


@pytest.mark.parametrize("family", ["qwen2-window", "qwen3", "gemma3"])
def test_kv_sharing_applies_to_every_family(tmp_path, family):
    """cla2 by uptraining (`share_kv`) on K/V with biases, per-head k norms, windows and local RoPE: each KV layer
    gets the mean of its readers' K/V parameters, the model keeps its own window layers, and the paged engine's
    greedy tokens equal the dense token-by-token oracle's."""
    import jax

    from conftest import dense_greedy
    from jaxkv.api import LLM
    from jaxkv.model.uptrain import share_kv
    from jaxkv.sharing import with_sharing

    write_tiny_hf_model(tmp_path, family)
    llm = jaxkv.load(str(tmp_path))
    shared_cfg = with_sharing(llm.config, "cla2")
    assert shared_cfg.window_layers == llm.config.window_layers
    cfg, params = share_kv(llm.config, llm.params, shared_cfg.kv_sources, shared_cfg.window_layers)
    assert cfg.kv_layers == (0, 2)
    before = [llm.params[f"layers_{i}"]["attn"] for i in range(3)]
    parts = [p for p in ("k_proj", "v_proj", "k_norm") if p in before[0]]
    assert parts[:2] == ["k_proj", "v_proj"] and ("k_norm" in parts) == (family != "qwen2-window")
    for part in parts:
        assert part not in params["layers_1"]["attn"]
        jax.tree.map(lambda got, a, b: np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-6),
                     params["layers_0"]["attn"][part], before[0][part], before[1][part])
        jax.tree.map(np.testing.assert_array_equal, params["layers_2"]["attn"][part], before[2][part])
    shared = LLM(cfg, llm.tokenizer, params)
    prompt = list(np.random.default_rng(2).integers(0, 256, size=19))
    got = shared.generate_ids([prompt], 12, SamplingParams(), ignore_eos=True)[0].token_ids
    assert got == dense_greedy(cfg, params, prompt, 12)


def test_export_to_hf_loads_in_transformers_with_equal_logits(family_model, tmp_path):
    """`export_hf` of every family: transformers loads the directory (config, safetensors, tokenizer) and computes
    the original model's logits; the tokenizer encodes as jaxkv's does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxkv.checkpoints.export import export_hf

    family, hf_model, llm = family_model
    out = export_hf(llm, tmp_path / "exported")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(exported) is type(hf_model), f"{family}: exported as {type(exported).__name__}"
    tokens = torch.tensor(np.random.default_rng(3).integers(0, 256, size=(1, 30)))
    with torch.no_grad():
        assert relative_error(exported(tokens).logits.numpy(), hf_model(tokens).logits.numpy()) < 1e-6, family
    text = "To be, or not to be: that is the question."
    assert AutoTokenizer.from_pretrained(out).encode(text) == llm.tokenizer.encode(text)


def test_export_refuses_what_hf_cannot_express(tmp_path):
    """A field the family's config cannot say is named, and nothing is written (shared KV on a Llama exports in
    the LCKV authors' format: tests/test_lckv_format.py)."""
    from jaxkv.api import LLM
    from jaxkv.checkpoints.export import export_hf

    write_tiny_hf_model(tmp_path / "hf", "mistral")
    llm = jaxkv.load(str(tmp_path / "hf"))
    one_window = LLM(llm.config.replace(window_layers=(1,)), llm.tokenizer, llm.params)
    with pytest.raises(JaxkvError, match=r"cannot be written as MistralForCausalLM: window_layers=\(1,\) "
                                         r"\(the format has \(0, 1, 2\)\)"):
        export_hf(one_window, tmp_path / "windowed")
    normed = LLM(llm.config.replace(qk_norm=True), llm.tokenizer, llm.params)
    with pytest.raises(JaxkvError, match=r"cannot be written as MistralForCausalLM: qk_norm=True"):
        export_hf(normed, tmp_path / "normed")
    assert not (tmp_path / "windowed").exists() and not (tmp_path / "normed").exists()


def test_cli_exports_a_checkpoint_to_hf(tmp_path):
    """`jaxkv convert --hf DIR --to-hf OUT` in a subprocess: transformers reads OUT's logits as the original's."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    jaxkv_cli = str(Path(sys.executable).parent / "jaxkv")
    hf_model = write_tiny_hf_model(tmp_path / "hf", "gemma3")
    done = subprocess.run([jaxkv_cli, "convert", "--hf", str(tmp_path / "hf"), "--to-hf",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert relative_error(exported(tokens).logits.numpy(), hf_model(tokens).logits.numpy()) < 1e-6
    again = subprocess.run([jaxkv_cli, "convert", "--hf", str(tmp_path / "hf"), "--to-hf",
                            str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 1, again.stderr
    assert again.stderr.strip().splitlines() == [f"jaxkv: error: refusing to overwrite {tmp_path / 'out'}: it exists "
                                                 "and is not empty"]


def test_cli_generates_what_transformers_generates(tmp_path):
    """`jaxkv generate --model DIR --json` on a Mistral (every layer windowed) in a subprocess: transformers' greedy
    token ids."""
    import subprocess
    import sys

    hf_model = write_tiny_hf_model(tmp_path, "mistral")
    prompt = "a prompt longer than the window of eight tokens"
    done = subprocess.run([str(Path(sys.executable).parent / "jaxkv"), "generate", "--model", str(tmp_path),
                           "--prompt", prompt, "--max-new-tokens", "10", "--ignore-eos", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ids = jaxkv.load(str(tmp_path)).tokenizer.encode(prompt)
    assert json.loads(done.stdout)["token_ids"] == _hf_greedy(hf_model, ids, 10)


def test_server_completes_what_transformers_generates(tmp_path):
    """A Gemma 2 (soft-caps, alternating windows) behind the real HTTP server on 127.0.0.1, driven by the OpenAI
    client: the greedy completion is transformers' greedy tokens, decoded. The server runs as `jaxkv serve
    --no-window-pages` does (full tables for window layers; rings are checked through the API above)."""
    import socket
    import threading

    import openai
    import uvicorn

    from jaxkv.serve.server import create_app
    from test_server import wait_healthy

    hf_model = write_tiny_hf_model(tmp_path, "gemma2")
    llm = jaxkv.load(str(tmp_path))
    app = create_app(llm, model_name="tiny-gemma2", max_batch=2, page_size=16, max_context=64, window_pages=False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_healthy(base, 60)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=300)
        prompt = "the windows of gemma alternate"
        got = client.completions.create(model="tiny-gemma2", prompt=prompt, max_tokens=10, temperature=0,
                                        extra_body={"ignore_eos": True})
        want = llm.tokenizer.decode(_hf_greedy(hf_model, llm.tokenizer.encode(prompt), 10))
        assert got.choices[0].text == want
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
