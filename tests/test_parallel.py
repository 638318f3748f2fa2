"""jaxkv.parallel: mesh specs, the logical-axis rules and what they place on 8 CPU devices.

The device checks run in one subprocess: XLA_FLAGS must give 8 host devices before JAX starts,
and other tests in this process have started it already. The script prints one JSON object.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P

from jaxkv.errors import JaxkvError
from jaxkv.parallel import logical_to_mesh, make_mesh, parse_mesh_spec

SCRIPT = r'''
import dataclasses, json
import jax, jax.numpy as jnp, optax
from jax.sharding import PartitionSpec as P
from jaxkv.cache.dense import KVCache
from jaxkv.cache.paged import PagedKV, PagePool, StepMetadata
from jaxkv.config import ModelConfig
from jaxkv.model.decoder import forward, init_params, param_shardings, shard_params
from jaxkv.parallel import cache_shardings, logical_to_mesh, make_mesh, opt_state_shardings
from jaxkv.train.trainer import decay_mask, train_step

out = {"devices": jax.device_count()}
ratio = lambda a: a.nbytes // a.addressable_shards[0].data.nbytes  # whole array / one device's part
specs = lambda tree: jax.tree.map(lambda s: [list(e) if isinstance(e, tuple) else e for e in s.spec], tree)
fields = lambda cache: {f.name: getattr(cache, f.name) for f in dataclasses.fields(cache)
                        if f.metadata.get("pytree_node", True) and getattr(cache, f.name) is not None}

out["meshes"] = {str(s): dict(make_mesh(s).shape) for s in ("data=2,model=4", "model=2,data=-1", "fsdp=-1", None)}
out["mesh4"] = dict(make_mesh("model=4", jax.devices()[:4]).shape)
out["axis_names"] = list(make_mesh("seq=8").axis_names)
df = make_mesh("data=2,fsdp=4")  # an axis serves one dimension only, and only where it divides
out["activations"] = {n: specs(logical_to_mesh(P("batch", "seq", "embed"), df, (n, 3, 32))) for n in (8, 2)}

tiny = dict(vocab_size=64, d_model=32, n_layers=1, head_dim=8, mlp_dim=64)
init = jax.jit(init_params, static_argnums=0)  # one compile: eager init dispatches op by op
even = ModelConfig(**tiny, n_heads=4, n_kv_heads=4)
smol = ModelConfig(**tiny, n_heads=9, n_kv_heads=3)  # SmolLM2-135M's head counts
dm = make_mesh("data=2,model=4")

def layer(params):
    return {name: params["layers_0"][group][name]["kernel"] for group, names in
            (("attn", ("q_proj", "k_proj", "o_proj")), ("mlp", ("gate_proj", "down_proj"))) for name in names}

def sharded_forward(cfg, mesh, params, tokens, cache):
    """Prefill, then one decode step: unsharded vs jit with in/out shardings from the rules."""
    def run(params, tokens, cache):
        logits, cache = forward(cfg, params, tokens, cache)
        step, cache = forward(cfg, params, jnp.argmax(logits[:, -1:], -1).astype(jnp.int32), cache)
        return logits, step, cache
    ref = jax.jit(run)(params, tokens, cache)
    p_sh, c_sh = param_shardings(cfg, mesh), cache_shardings(cache, mesh)
    t_sh = logical_to_mesh(P("batch", "seq"), mesh, tokens.shape)
    got = jax.jit(run, in_shardings=(p_sh, t_sh, c_sh), out_shardings=(None, None, c_sh))(
        shard_params(params, cfg, mesh), jax.device_put(tokens, t_sh), jax.device_put(cache, c_sh))
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(ref[:2], got[:2]))
    cache_diff = max(float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))
                     for a, b in zip(jax.tree.leaves(ref[2]), jax.tree.leaves(got[2])))
    return {"diff": diff, "cache_diff": cache_diff,
            "out_cache_specs": specs({k: a.sharding for k, a in fields(got[2]).items()})}

tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 6), 0, 64, jnp.int32)
for name, cfg in (("even", even), ("smol", smol)):
    params = init(cfg, jax.random.PRNGKey(0))
    placed = shard_params(params, cfg, dm)
    out[name] = {"specs": specs(jax.tree.map(lambda a: a.sharding, layer(placed))),
                 "ratios": {k: ratio(a) for k, a in {**layer(placed), "embedding": placed["embed"]["embedding"],
                                                     "lm_head": placed["lm_head"]["kernel"],
                                                     "norm": placed["final_norm"]["scale"]}.items()},
                 "dense": sharded_forward(cfg, dm, params, tokens, KVCache.init(cfg, 4, 16))}
def sharded_paged(cfg, mesh, params, tokens, pool):
    """A step of four ragged prompts packed together, then a step of one token each (the page pool's KV heads
    split over model; the reference ragged attention on CPU): unsharded vs jit with the rules' shardings."""
    tables, lengths = jnp.arange(8, dtype=jnp.int32).reshape(4, 2), [6, 3, 5, 1]
    prompts, steps = StepMetadata.pack([tables], [0] * 4, lengths), StepMetadata.pack([tables], lengths, [1] * 4)
    packed = jnp.concatenate([tokens[r, :n] for r, n in enumerate(lengths)])
    def run(params, pool):
        logits, kv = forward(cfg, params, packed[None], PagedKV.whole(pool, prompts), logits_at=prompts.logits_index[None])
        nxt = jnp.argmax(logits[0], -1).astype(jnp.int32)
        step, kv = forward(cfg, params, nxt[None], PagedKV.whole(kv.pools[0], steps), logits_at=steps.logits_index[None])
        return logits, step, kv.pools[0]
    ref = jax.jit(run)(params, pool)
    p_sh, c_sh = param_shardings(cfg, mesh), cache_shardings(pool, mesh)
    got = jax.jit(run, in_shardings=(p_sh, c_sh), out_shardings=(None, None, c_sh))(
        shard_params(params, cfg, mesh), jax.device_put(pool, c_sh))
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(ref[:2], got[:2]))
    pool_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ref[2]), jax.tree.leaves(got[2])))
    return {"diff": diff, "cache_diff": pool_diff,
            "out_cache_specs": specs({k: a.sharding for k, a in fields(got[2]).items()})}

out["even"]["paged"] = sharded_paged(even, dm, init(even, jax.random.PRNGKey(0)), tokens, PagePool.init(even, 8, 4, 4))

dense = jax.device_put(KVCache.init(even, 4, 16), cache_shardings(KVCache.init(even, 4, 16), dm))
out["dense_cache"] = {"k_ratio": ratio(dense.k), "lengths_ratio": ratio(dense.lengths),
                      "specs": specs(fields(cache_shardings(dense, dm)))}
int8 = PagePool.init(even, 8, 4, 4, "int8")
placed = jax.device_put(int8, cache_shardings(int8, dm))
out["int8_paged"] = {"k_ratio": ratio(placed.k_pages), "scales_ratio": ratio(placed.k_scales),
                     "specs": specs(fields(cache_shardings(int8, dm)))}

fsdp = make_mesh("fsdp=8")
placed = shard_params(init(even, jax.random.PRNGKey(0)), even, fsdp)
placed = {**layer(placed), "embedding": placed["embed"]["embedding"]}
out["fsdp"] = {"specs": specs(jax.tree.map(lambda a: a.sharding, placed)),
               "ratios": {k: ratio(a) for k, a in placed.items()}}

# training on fsdp=2 x model=4: optimizer state sharded like the weights, one step equal to the unsharded one
mesh = make_mesh("fsdp=2,model=4")
tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1, mask=decay_mask))
params = init(even, jax.random.PRNGKey(0))
p_sh = param_shardings(even, mesh)
o_sh = opt_state_shardings(tx, params, p_sh, mesh)
state_sh = {"params": p_sh, "opt_state": o_sh}
state = {"params": params, "opt_state": tx.init(params)}
rows = jax.random.randint(jax.random.PRNGKey(2), (4, 9), 0, 64, jnp.int32)
step = lambda state, rows: train_step(state, rows, model_cfg=even, tx=tx, grad_accum=1, remat=False)
ref_state, ref_metrics = jax.jit(step)(state, rows)
r_sh = logical_to_mesh(P("batch", None), mesh, rows.shape)
sharded_state = jax.device_put(state, state_sh)
new_state, metrics = jax.jit(step, in_shardings=(state_sh, r_sh), out_shardings=(state_sh, None))(
    sharded_state, jax.device_put(rows, r_sh))
mu = new_state["opt_state"][1][0].mu
out["train"] = {
    "loss_diff": abs(float(metrics["loss"]) - float(ref_metrics["loss"])),
    "grad_norm_diff": abs(float(metrics["grad_norm"]) - float(ref_metrics["grad_norm"])),
    "param_diff": max(float(jnp.max(jnp.abs(a - b))) for a, b in
                      zip(jax.tree.leaves(ref_state["params"]), jax.tree.leaves(new_state["params"]))),
    "mu_q_spec": specs(mu["layers_0"]["attn"]["q_proj"]["kernel"].sharding),
    "mu_q_ratio": ratio(mu["layers_0"]["attn"]["q_proj"]["kernel"]),
    "mu_embed_ratio": ratio(mu["embed"]["embedding"]),
    "count_spec": specs(new_state["opt_state"][1][0].count.sharding),
    "same_structure": jax.tree.structure(o_sh) == jax.tree.structure(state["opt_state"]),
}
# a masked inner state holds optax.MaskedNode where the mask is False: the structure must still match
masked = optax.masked(optax.adam(1e-3), decay_mask)
m_sh = opt_state_shardings(masked, params, p_sh, mesh)
out["masked_same_structure"] = jax.tree.structure(m_sh) == jax.tree.structure(masked.init(params))
print("JSON" + json.dumps(out))
'''


@pytest.fixture(scope="module")
def report() -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("JSON", 1)[1])


@pytest.mark.parametrize("spec, devices, expected", [
    ("data=2,model=4", 8, {"data": 2, "fsdp": 1, "seq": 1, "model": 4}),
    (" model = 4 , data=-1 ", 8, {"data": 2, "fsdp": 1, "seq": 1, "model": 4}),
    ("fsdp=-1", 8, {"data": 1, "fsdp": 8, "seq": 1, "model": 1}),
    ("seq=2,fsdp=2,data=1,model=2", 8, {"data": 1, "fsdp": 2, "seq": 2, "model": 2}),
    (None, 4, {"data": 4, "fsdp": 1, "seq": 1, "model": 1}),
    ("", 1, {"data": 1, "fsdp": 1, "seq": 1, "model": 1}),
])
def test_parse_mesh_spec(spec, devices, expected):
    parsed = parse_mesh_spec(spec, devices)
    assert parsed == expected and list(parsed) == ["data", "fsdp", "seq", "model"]


@pytest.mark.parametrize("spec, message", [
    ("data=2,tensor=4", "unknown axis 'tensor'"),
    ("data=2,data=4", "axis 'data' is given twice"),
    ("data=two", "size of 'data' must be an integer"),
    ("data=0,model=8", "must be positive"),
    ("data=-2,model=-4", "must be positive"),
    ("data=-1,model=-1", "only one axis may be -1"),
    ("data=2,model=2", "uses 4 devices but 8 are available"),
    ("model=3,data=-1", "does not divide the 8 devices"),
    ("data", "expected axis=size"),
    ("data=2,,model=4", "expected axis=size"),
])
def test_bad_mesh_specs(spec, message):
    with pytest.raises(JaxkvError, match=message) as info:
        parse_mesh_spec(spec, 8)
    assert "\n" not in str(info.value)


def test_meshes_have_all_four_axes(report):
    assert report["devices"] == 8
    assert report["meshes"] == {"data=2,model=4": {"data": 2, "fsdp": 1, "seq": 1, "model": 4},
                                "model=2,data=-1": {"data": 4, "fsdp": 1, "seq": 1, "model": 2},
                                "fsdp=-1": {"data": 1, "fsdp": 8, "seq": 1, "model": 1},
                                "None": {"data": 8, "fsdp": 1, "seq": 1, "model": 1}}
    assert report["mesh4"] == {"data": 1, "fsdp": 1, "seq": 1, "model": 4}  # over the devices given
    assert report["axis_names"] == ["data", "fsdp", "seq", "model"]


def test_logical_to_mesh_uses_each_axis_once(report):
    """batch -> (data, fsdp) takes both where the batch divides by 8; with a batch of 2 fsdp is
    left to embed. On one device everything is replicated; unknown names raise."""
    assert report["activations"] == {"8": [["data", "fsdp"], None, None], "2": ["data", None, "fsdp"]}
    mesh = make_mesh(None)
    assert logical_to_mesh(P("batch", "embed"), mesh, (4, 8)).spec == P(None, None)
    with pytest.raises(JaxkvError, match="logical axis 'experts' has no sharding rule"):
        logical_to_mesh(P("experts"), mesh, (4,))
    with pytest.raises(JaxkvError, match="name more dimensions"):
        logical_to_mesh(P("batch", "seq"), mesh, (4,))


def test_tensor_parallel_weights_are_split_by_model(report):
    """data=2 x model=4 with 4 heads: heads, MLP units and vocabulary split 4 ways, norms whole."""
    even = report["even"]
    assert even["specs"] == {"q_proj": [None, "model", None], "k_proj": [None, "model", None],
                             "o_proj": ["model", None, None], "gate_proj": [None, "model"],
                             "down_proj": ["model", None]}
    assert even["ratios"] == {"q_proj": 4, "k_proj": 4, "o_proj": 4, "gate_proj": 4, "down_proj": 4,
                              "embedding": 4, "lm_head": 4, "norm": 1}


def test_indivisible_heads_are_replicated(report):
    """9 query heads and 3 KV heads do not split over model=4: those weights stay whole, the MLP still splits."""
    smol = report["smol"]
    assert smol["specs"] == {"q_proj": [None, None, None], "k_proj": [None, None, None],
                             "o_proj": [None, None, None], "gate_proj": [None, "model"], "down_proj": ["model", None]}
    assert smol["ratios"]["q_proj"] == smol["ratios"]["k_proj"] == 1 and smol["ratios"]["gate_proj"] == 4


@pytest.mark.parametrize("model, cache", [("even", "dense"), ("smol", "dense"), ("even", "paged")])
def test_sharded_forward_matches_unsharded(report, model, cache):
    """Prefill and a decode step under jit with the rules' in/out shardings equal the one-device run."""
    run = report[model][cache]
    assert run["diff"] < 1e-5 and run["cache_diff"] < 1e-5
    kv_heads = "model" if model == "even" else None  # 3 KV heads: replicated on model=4
    if cache == "dense":
        assert run["out_cache_specs"] == {"k": [None, "data", None, kv_heads, None],
                                          "v": [None, "data", None, kv_heads, None], "lengths": ["data"]}
    else:
        assert run["out_cache_specs"]["k_pages"] == [None, kv_heads, None, None, None]


def test_cache_bytes_per_device(report):
    """A dense cache splits data x model ways; a paged pool splits its KV heads only (pages stay global)."""
    dense = report["dense_cache"]
    assert dense["k_ratio"] == 8 and dense["lengths_ratio"] == 2
    assert dense["specs"]["k"] == [None, "data", None, "model", None]
    int8 = report["int8_paged"]
    assert int8["k_ratio"] == 4 and int8["scales_ratio"] == 4
    assert int8["specs"]["k_scales"] == [None, "model", None, None]


def test_fsdp_shards_embed_dims(report):
    fsdp = report["fsdp"]
    assert fsdp["specs"] == {"q_proj": ["fsdp", None, None], "k_proj": ["fsdp", None, None],
                             "o_proj": [None, None, "fsdp"], "gate_proj": ["fsdp", None],
                             "down_proj": [None, "fsdp"], "embedding": [None, "fsdp"]}
    assert set(fsdp["ratios"].values()) == {8}


def test_sharded_train_step(report):
    """fsdp=2 x model=4: Adam's moments take the weights' shardings, the step count is replicated,
    and one step equals the unsharded step."""
    train = report["train"]
    # Adam's first step is about lr * sign(gradient): 1e-3 per weight, so 1e-5 is 1% of a step
    assert train["loss_diff"] < 1e-5 and train["grad_norm_diff"] < 1e-5 and train["param_diff"] < 1e-5
    assert train["mu_q_spec"] == ["fsdp", "model", None] and train["mu_q_ratio"] == 8
    assert train["mu_embed_ratio"] == 8 and train["count_spec"] == []
    assert train["same_structure"] and report["masked_same_structure"]
