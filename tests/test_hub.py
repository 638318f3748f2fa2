"""Models by Hugging Face Hub id ("org/name[@revision]"), downloaded by huggingface_hub from a fake Hub on
127.0.0.1 (name look-ups other than loopback fail the module), converted once per commit, loaded offline.

The fake Hub is tests/fake_hub.py. huggingface_hub is imported before these tests set HF_ENDPOINT, HF_HOME and
HF_HUB_OFFLINE (transformers writes the tiny models), so they also check that jaxkv honours the variables as they
are at call time.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import huggingface_hub.constants
import jax
import numpy as np
import pytest
import torch

import jaxkv
from conftest import relative_error, write_tiny_hf_llama
from fake_hub import FakeHub
from jaxkv.cache.dense import KVCache
from jaxkv.checkpoints.hub import hub_checkpoint, parse_hub_id
from jaxkv.checkpoints.registry import resolve_config
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.model.decoder import forward

REPO = "tiny-org/tiny-llama"
MAIN_SHA = "5b1e0c9d2f7a4e3b8c6d1a0f9e8d7c6b5a4f3e2d"
V2_SHA = "0a9b8c7d6e5f40312233445566778899aabbccdd"
JAXKV = str(Path(sys.executable).parent / "jaxkv")
def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The served repo folders and the torch model of the main revision."""
    root = tmp_path_factory.mktemp("repos")
    model = write_tiny_hf_llama(root / "main", tie=False)
    write_tiny_hf_llama(root / "v2", tie=False, n_kv_heads=4, seed=1)
    (root / "bin").mkdir()
    (root / "bin" / "config.json").write_bytes((root / "main" / "config.json").read_bytes())
    (root / "bin" / "pytorch_model.bin").write_bytes(b"\0" * 64)
    (root / "readme").mkdir()
    (root / "readme" / "README.md").write_text("no model here\n")
    return root, model


@pytest.fixture(scope="module")
def hub(tiny, tmp_path_factory):
    """The fake Hub running, with HF_ENDPOINT, HF_HOME and JAXKV_HOME pointing at it and at empty folders."""
    root, _ = tiny
    gated = {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model tiny-org/gated is restricted. You "
             "must have access to it and be authenticated to access it. Please log in."}
    server = FakeHub({REPO: {"main": (MAIN_SHA, root / "main"), "v2": (V2_SHA, root / "v2")},
                      "tiny-org/bin-only": {"main": ("b" * 40, root / "bin")},
                      "tiny-org/readme-only": {"main": ("c" * 40, root / "readme")}},
                     {"tiny-org/gated": (403, gated)})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    outside, getaddrinfo = [], socket.getaddrinfo

    def loopback_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost"):
            outside.append(host)
            raise OSError(f"test_hub reaches only 127.0.0.1, not {host}")
        return getaddrinfo(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", loopback_only)
        # Else the first request's user agent fetches {ENDPOINT}/api/agent-harnesses, from the ENDPOINT read at import.
        mp.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        mp.setenv("HF_ENDPOINT", server.url)
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        mp.setenv("JAXKV_HOME", str(tmp_path_factory.mktemp("jaxkv_home")))
        for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "JAXKV_DEBUG"):
            mp.delenv(name, raising=False)
        yield server
    server.shutdown()
    server.server_close()
    assert not outside, f"tried to reach {outside}"


@pytest.fixture(scope="module")
def first_load(hub):
    """jaxkv.load of the Hub id into empty caches: (LLM, its stderr, the requests the Hub saw)."""
    hub.seen.clear()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        llm = jaxkv.load(REPO)
    return llm, err.getvalue(), list(hub.seen)


def _checkpoint_dir(sha: str) -> Path:
    return Path(os.environ["JAXKV_HOME"]) / "models" / "hub" / "tiny-org--tiny-llama" / sha


def test_parse_hub_id():
    assert parse_hub_id("Qwen/Qwen2.5-0.5B") == ("Qwen/Qwen2.5-0.5B", None)
    assert parse_hub_id("a_b/c.d@refs/pr/1") == ("a_b/c.d", "refs/pr/1")
    for name in ("smollm2-135m", "a/b/c", "a/b@", "a/b@x y", "../x", "./x", "~/x", "a/b--c", "/abs/x", "a/-b"):
        assert parse_hub_id(name) is None, name


def test_load_downloads_converts_and_matches_transformers(first_load, tiny):
    llm, err, seen = first_load
    assert f"jaxkv: converting {REPO}@{MAIN_SHA[:12]} into {_checkpoint_dir(MAIN_SHA)} (once)" in err
    assert ("GET", f"/api/models/{REPO}/revision/main") in seen
    assert ("GET", f"/api/models/{REPO}/tree/{MAIN_SHA}") in seen
    files = {path.rsplit("/", 1)[1] for method, path in seen if method == "GET" and "/resolve/" in path}
    want = {p.name for p in (tiny[0] / "main").iterdir() if p.suffix == ".safetensors"}
    assert len(want) > 1 and want | {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= files
    assert (Path(os.environ["HF_HOME"]) / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / MAIN_SHA).is_dir()
    assert llm.config.name == REPO
    tokens = np.arange(1, 30)[None]
    with torch.no_grad():
        want_logits = tiny[1](torch.tensor(tokens)).logits.numpy()
    got, _ = forward(llm.config, llm.params, tokens, KVCache.init(llm.config, 1, 32))
    assert relative_error(got, want_logits) < 1e-4


def test_second_load_reuses_the_conversion_and_works_offline(first_load, hub, monkeypatch, capsys):
    stamp = (_checkpoint_dir(MAIN_SHA) / "config.json").stat().st_mtime_ns
    hub.seen.clear()
    again = jaxkv.load(REPO)
    assert hub.seen == [("GET", f"/api/models/{REPO}/revision/main")]  # the commit of main; nothing downloaded
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())  # as if the Hub were gone
    offline = jaxkv.load(REPO)
    assert "converting" not in capsys.readouterr().err
    assert (_checkpoint_dir(MAIN_SHA) / "config.json").stat().st_mtime_ns == stamp
    for llm in (again, offline):
        assert jax.tree.all(jax.tree.map(np.array_equal, llm.params, first_load[0].params))


def test_revision_picks_that_commit(hub):
    assert resolve_config(REPO).n_kv_heads == 2
    hub.seen.clear()
    cfg = resolve_config(f"{REPO}@v2")
    assert (cfg.name, cfg.n_kv_heads) == (REPO, 4)
    assert not any(path.endswith(".safetensors") for _, path in hub.seen), "a config needs no weights"
    out = hub_checkpoint(f"{REPO}@v2")
    assert out == _checkpoint_dir(V2_SHA) and ModelConfig.load(out / "config.json").n_kv_heads == 4
    hub.seen.clear()
    assert hub_checkpoint(f"{REPO}@{V2_SHA}") == out  # a commit sha needs no look-up at all
    assert hub.seen == []


@pytest.mark.parametrize("name, offline, closed, expected", [
    ("tiny-org/nope", False, False, r"unknown model 'tiny-org/nope': no such local path, and http://127\.0\.0\.1:\d+ "
                                    r"has no such repository \(check the spelling, or set HF_TOKEN if it is private\)"),
    ("tiny-org/gated", False, False, r"tiny-org/gated is gated or private: accept its terms at "
                                     r"http://127\.0\.0\.1:\d+/tiny-org/gated and set HF_TOKEN"),
    ("tiny-org/bin-only", False, False, r"tiny-org/bin-only has no \*\.safetensors weights \(jaxkv reads "
                                        r"safetensors; pytorch_model\.bin is not supported\)"),
    ("tiny-org/readme-only", False, False, r"tiny-org/readme-only has no config\.json"),
    (f"{REPO}@nope", False, False, r"tiny-org/tiny-llama has no revision 'nope'"),
    (REPO, False, True, r"tiny-org/tiny-llama is not in the local Hugging Face cache and http://127\.0\.0\.1:\d+ "
                        r"\(HF_ENDPOINT\) cannot be reached \(HF_HUB_OFFLINE=1 uses only the cache\)"),
    (REPO, True, False, r"tiny-org/tiny-llama is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
])
def test_hub_errors_are_one_line(hub, monkeypatch, tmp_path, name, offline, closed, expected):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if closed:
        monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    with pytest.raises(JaxkvError) as e:
        jaxkv.load(name)
    assert re.match(expected, str(e.value)) and "\n" not in str(e.value)


def test_cli(first_load):
    """`--model org/name@rev` loads from the cache; an unknown repo is one line of error and exit code 1."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    runs = [[JAXKV, "generate", "--model", f"{REPO}@main", "--prompt", "hi", "--max-new-tokens", "4"],
            [JAXKV, "generate", "--model", "tiny-org/nope", "--prompt", "hi"]]
    with ThreadPoolExecutor(2) as pool:
        ok, bad = pool.map(lambda cmd: subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300), runs)
    assert ok.returncode == 0, ok.stderr
    assert "converting" not in ok.stderr
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [f"jaxkv: error: unknown model 'tiny-org/nope': no such local path, "
                                               f"and {os.environ['HF_ENDPOINT']} has no such repository (check the "
                                               f"spelling, or set HF_TOKEN if it is private)"]
