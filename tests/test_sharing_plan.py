"""KV-sharing maps and `jaxkv plan` against the papers' own figures and strings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import relative_error
from jaxkv.cache.dense import KVCache, kv_bytes_per_token
from jaxkv.checkpoints.registry import resolve_config
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.model.decoder import forward, init_params
from jaxkv.plan import parameter_count, parse_bytes, plan, plot_plan
from jaxkv.sharing import cla, from_string, lckv, parse_spec, to_string, yoco

JAXKV = str(Path(sys.executable).parent / "jaxkv")


def test_maps_match_published_lckv_configs():
    # The LCKV authors' README spells these for their 22-layer TinyLlama.
    assert to_string(lckv(22, 2)) == "0_" + "_".join(["20"] * 20) + "_21"
    assert to_string(cla(22, 2)) == "0_0_2_2_4_4_6_6_8_8_10_10_12_12_14_14_16_16_18_18_20_20"
    # methods.md: w=2 on 22 layers stores KV for layers 0, 20, 21.
    cfg = ModelConfig(vocab_size=8, d_model=8, n_layers=22, n_heads=1, n_kv_heads=1, head_dim=8, mlp_dim=8,
                      kv_sources=lckv(22, 2))
    assert cfg.kv_layers == (0, 20, 21)
    assert yoco(8) == (0, 1, 2, 3, 4, 4, 4, 4)


@given(st.lists(st.tuples(st.integers(0, 40), st.booleans()), min_size=1, max_size=40))
def test_string_round_trip(raw):
    sources = tuple(s for s, _ in raw)
    windowed = tuple(i for i, (_, w) in enumerate(raw) if w)
    assert from_string(to_string(sources, windowed)) == (sources, windowed)


@pytest.mark.parametrize("kv_heads, factor, want", [
    (16, 1, 163_840), (4, 1, 40_960), (1, 1, 10_240), (1, 2, 5_120), (1, 3, 3_584), (1, 4, 2_560),
])
def test_cla_paper_bytes_per_token(kv_heads, factor, want):
    """CLA paper, 1B models (d_model 2048, 20 layers, head dim 128), 16-bit KV."""
    cfg = ModelConfig(vocab_size=50_000, d_model=2048, n_layers=20, n_heads=16, n_kv_heads=kv_heads, head_dim=128,
                      mlp_dim=5632, dtype="bfloat16", param_dtype="bfloat16", kv_sources=cla(20, factor))
    assert kv_bytes_per_token(cfg) == want


def test_llama2_plan_and_parameter_counts():
    llama2 = resolve_config("llama-2-7b")
    p = plan(llama2, context=4096, batch=1)
    assert p["kv_bytes"] == 2 * 1024**3
    assert p["parameters"] == 6_738_415_616  # Meta's published count for Llama-2-7B
    shared = llama2.replace(kv_sources=cla(32, 2))
    removed = 16 * 2 * 4096 * 32 * 128  # 16 layers lose K and V projections [d_model, kv_heads, head_dim]
    assert parameter_count(llama2) - parameter_count(shared) == removed


def test_max_batch_fits_memory():
    cfg = resolve_config("smollm2-135m").replace(kv_sources=lckv(30, 2))
    memory = parse_bytes("24GiB")
    p = plan(cfg, context=8192, batch=1, memory=memory)
    per_sequence = 2 * 3 * 3 * 64 * 4 * 8192  # 3 KV layers, fp32
    assert p["max_batch"] == (memory - p["weight_bytes"]) // per_sequence
    assert (p["max_batch"] + 1) * per_sequence + p["weight_bytes"] > memory


@pytest.mark.parametrize("spec, message", [
    ("cla", "needs a number"), ("lckv:40", "warmup"), ("0_1", "has 2 layers"), ("0x_1_2_3", "sliding-window"),
    ("yoco3", "no number"), ("x_y", "bad KV-sharing string"), ("pizza-top", "needs a number"),
    ("lasagna-middle:1", "2..4 KV layers"), ("pizza-side:2", "bad KV-sharing string"),
])
def test_bad_specs(spec, message):
    with pytest.raises(JaxkvError, match=message):
        parse_spec(spec, 4)


def test_cla_model_decodes_consistently():
    """A CLA2 model stores half the KV and its incremental decode equals its full forward."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64,
                      kv_sources=cla(4, 2))
    params = init_params(cfg, jax.random.PRNGKey(1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 12)))
    full, _ = forward(cfg, params, tokens, KVCache.init(cfg, 2, 16))
    cache = KVCache.init(cfg, 2, 16)
    assert cache.k.shape[0] == 2
    steps = []
    for t in range(12):
        logits, cache = forward(cfg, params, tokens[:, t:t + 1], cache)
        steps.append(logits)
    assert relative_error(jnp.concatenate(steps, axis=1), full) < 1e-5


def test_plan_cli():
    out = subprocess.run([JAXKV, "plan", "--model", "llama-2-7b", "--kv-sharing", "cla2", "--memory", "80GB",
                          "--json"], capture_output=True, text=True, check=True)
    plans = json.loads(out.stdout)["plans"]
    assert plans["baseline"]["kv_bytes"] == 2 * 1024**3 and plans["cla2"]["kv_bytes"] == 1024**3
    bad = subprocess.run([JAXKV, "plan", "--memory", "12XB"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "memory size" in bad.stderr


def test_plan_plot_draws_what_the_plan_says(tmp_path):
    """`jaxkv plan --plot`: a PNG; its curves are the plan's numbers (KV per sequence at the context, the largest
    batch at the memory), one curve per variant; an unwritable file is one line."""
    out = tmp_path / "plan.png"
    done = subprocess.run([JAXKV, "plan", "--model", "llama-2-7b", "--kv-sharing", "cla2", "--kv-dtype", "int8",
                           "--context", "4096", "--memory", "80GB", "--plot", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    base = resolve_config("llama-2-7b")
    shared = base.replace(kv_sources=cla(base.n_layers, 2))
    variants = {"baseline": (base, None), "int8": (base, "int8"), "cla2 int8": (shared, "int8")}
    figure = plot_plan(variants, 4096, parse_bytes("80GB"))
    by_context, by_memory = figure.axes
    for (label, (cfg, kv_dtype)), kv_line, batch_line in zip(variants.items(), by_context.get_lines(),
                                                              by_memory.get_lines()):
        assert kv_line.get_label() == label
        contexts, mib = kv_line.get_data()
        want = plan(cfg, 4096, 1, kv_dtype)["kv_bytes_per_sequence"] / 2**20
        assert mib[list(contexts).index(4096)] == pytest.approx(want), label
        memories, batches = batch_line.get_data()
        at = len(memories) // 2  # 80 GB is half way along the axis
        assert memories[at] * 2**30 == pytest.approx(parse_bytes("80GB"), rel=0.01)
        assert batches[at] == plan(cfg, 4096, 1, kv_dtype, int(memories[at] * 2**30))["max_batch"], label
    bad = subprocess.run([JAXKV, "plan", "--plot", str(tmp_path / "no" / "such" / "dir.png")], capture_output=True,
                         text=True)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "cannot write the plot" in bad.stderr
