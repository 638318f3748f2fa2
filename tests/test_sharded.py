"""Sharded inference and training equal their single-device runs (8 simulated CPU devices), and a
2-process job on JAX's distributed runtime matches one process.

Device checks run in subprocesses: XLA_FLAGS must give several host devices before JAX starts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# each model on one mesh (each pair compiles its own engine steps): both meshes, every model, LCKV on both
GENERATE = [("standard", "data=2,model=4"), ("cla2", "seq=2,model=2,fsdp=2"), ("lckv", "data=2,model=4"),
            ("lckv", "seq=2,model=2,fsdp=2")]

SCRIPT = r'''
import json, tempfile
from pathlib import Path
import jax, jax.numpy as jnp, numpy as np
# A compilation cache of this run only: the trainer's three runs on one mesh (and the resumed ones) compile the same
# steps, and load them from it as a restarted job would, instead of compiling them again.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
from conftest import byte_tokenizer_files, dense_greedy
from jaxkv.api import LLM
from jaxkv.config import ModelConfig
from jaxkv.generate.sampling import SamplingParams
from jaxkv.model.decoder import init_params, param_shardings, shard_params
from jaxkv.parallel import make_mesh, opt_state_shardings
from jaxkv.serve.engine import Engine, Request
from jaxkv.sharing import cla, lckv
from jaxkv.tokenizer import Tokenizer
from jaxkv.train.trainer import optimizer, train_step
from jaxkv.train.config import TrainSection
from pallas_kernels import paged_attention

out = {}
GENERATE = GENERATE_PAIRS
base = dict(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=64)
models = {"standard": {}, "cla2": dict(kv_sources=cla(4, 2)), "lckv": dict(kv_sources=lckv(4, 2))}
prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [11] * 12, [5, 6]]
tmp = Path(tempfile.mkdtemp())
byte_tokenizer_files(tmp)
tokenizer = Tokenizer.load(tmp)  # (its EOS ids lie past this vocabulary)
for name, spec in GENERATE:
    cfg = ModelConfig(**base, **models[name])
    params = init_params(cfg, jax.random.PRNGKey(0))
    want = [dense_greedy(cfg, params, p, 10) for p in prompts]  # one compile per model
    got = LLM(cfg, tokenizer, params, page_size=8, mesh=spec).generate_ids(prompts, 10, SamplingParams())
    out[f"generate {name} {spec}"] = [c.token_ids for c in got] == want

# the serving engine on a mesh: the same greedy tokens as on one device
cfg = ModelConfig(**{**base, "vocab_size": 258})
params = init_params(cfg, jax.random.PRNGKey(1))
def serve(mesh):
    engine = Engine(LLM(cfg, tokenizer, params, mesh=mesh), max_batch=4, page_size=8, prefill_chunk=16)
    for i, p in enumerate(prompts):
        engine.add(Request(p, max_tokens=8, request_id=str(i)))
    tokens = {}
    while engine.has_work():
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.token_ids)
    pools = engine.pools[0].k_pages
    return tokens, pools.nbytes // pools.addressable_shards[0].data.nbytes
single, _ = serve(None)
sharded, pool_ratio = serve("data=4,model=2")
out["engine"] = sharded == single
out["engine pool ratio"] = pool_ratio

# per-device bytes of the parameters and of a generator's cache
cfg = ModelConfig(**base)
params = init_params(cfg, jax.random.PRNGKey(0))
placed = shard_params(params, cfg, make_mesh("fsdp=2,model=4"))
q = placed["layers_0"]["attn"]["q_proj"]["kernel"]
out["q_proj ratio"] = q.nbytes // q.addressable_shards[0].data.nbytes

# a Pallas kernel under a mesh runs per shard (shard_map) and equals the reference
rng = np.random.default_rng(0)
K, N, S, D, B, H = 4, 16, 8, 16, 4, 8
k_pages, v_pages = (jnp.asarray(rng.standard_normal((K, N, S, D)), jnp.float32) for _ in range(2))
qs = jnp.asarray(rng.standard_normal((B, H, D)), jnp.float32)
tables = jnp.asarray(rng.permutation(N).reshape(B, 4), jnp.int32)
lengths = jnp.asarray([1, 9, 32, 17], jnp.int32)
ref = paged_attention(qs, k_pages, v_pages, tables, lengths, backend="reference")
kernel = jax.jit(lambda *a: paged_attention(*a, backend="gpu", interpret=True))
with jax.set_mesh(make_mesh("data=2,model=4")):
    got = kernel(qs, k_pages, v_pages, tables, lengths)
    text = str(jax.make_jaxpr(kernel)(qs, k_pages, v_pages, tables, lengths))
out["kernel diff"] = float(jnp.max(jnp.abs(got - ref)))
out["kernel shard_map"] = "shard_map" in text

# train steps: data parallel, FSDP, tensor and sequence parallel give the same loss and gradients
section = TrainSection(lr=1e-2, warmup_steps=0, grad_accum=2, batch_size=8)
tx = optimizer(section)
rows = jax.random.randint(jax.random.PRNGKey(2), (8, 17), 0, 64, jnp.int32)
for name, changes in models.items():
    cfg = ModelConfig(**base, **changes)
    params = init_params(cfg, jax.random.PRNGKey(0))
    step = lambda state, rows: train_step(state, rows, model_cfg=cfg, tx=tx, grad_accum=2, remat=False)
    state = {"params": params, "opt_state": tx.init(params)}
    want_state, want = jax.jit(step)(state, rows)
    for spec in ("data=8",) * (name == "standard") + ("fsdp=4,model=2", "data=2,seq=2,model=2"):
        mesh = make_mesh(spec)
        p_sh = param_shardings(cfg, mesh)
        placed = jax.device_put(state, {"params": p_sh, "opt_state": opt_state_shardings(tx, params, p_sh, mesh)})
        with jax.set_mesh(mesh):
            got_state, got = jax.jit(step)(placed, rows)
        out[f"train {name} {spec}"] = {
            "loss": abs(float(got["loss"]) - float(want["loss"])),
            "grad_norm": abs(float(got["grad_norm"]) - float(want["grad_norm"])),
            "params": max(float(jnp.max(jnp.abs(a - b))) for a, b in
                          zip(jax.tree.leaves(got_state["params"]), jax.tree.leaves(want_state["params"])))}

# the whole trainer on a mesh: the same losses as on one device, and a sharded run resumes exactly
import yaml
from conftest import write_text_corpus
from jaxkv.train import TrainConfig, train
root = Path(tempfile.mkdtemp())
files = write_text_corpus(root / "corpus")
(root / "micro.yaml").write_text(yaml.safe_dump({"model": dict(
    name="micro", vocab_size=300, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16, mlp_dim=64,
    max_seq_len=64)}))
def run(name, mesh=None, callback=None):
    cfg = TrainConfig.from_dict({
        "model": {"config": str(root / "micro.yaml")}, "tokenizer": {"train_bpe": 300},
        "data": {"source": [str(root / "corpus" / "*.txt")], "validation": [str(files[-1])], "seq_len": 32},
        "train": {"steps": 6, "batch_size": 8, "grad_accum": 2, "warmup_steps": 2, "log_every": 1, "eval_every": 3,
                  "eval_batches": 2},
        "checkpoint": {"every": 3, "keep": 2}, "out": str(root / name)})
    train(cfg, mesh=mesh, callback=callback)
    return [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
alone, sharded = run("alone"), run("sharded", "data=2,fsdp=2,model=2")
def interrupt(record):  # as Ctrl-C would, after the checkpoint of step 3
    if record["step"] == 4 and "loss" in record:
        raise KeyboardInterrupt
try:
    run("resumed", "data=2,fsdp=2,model=2", interrupt)
except KeyboardInterrupt:
    pass
resumed = run("resumed", "data=2,fsdp=2,model=2")
out["trainer"] = {
    "steps": [r["step"] for r in sharded] == [r["step"] for r in alone],
    "loss": max(abs(a.get("loss", a.get("val_loss")) - b.get("loss", b.get("val_loss")))
                for a, b in zip(alone, sharded)),
    "resumed": max(abs(a.get("loss", a.get("val_loss")) - b.get("loss", b.get("val_loss")))
                   for a, b in zip(sharded, resumed))}
print("REPORT " + json.dumps(out))
'''

TWO_PROCESS = r'''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jaxkv.parallel import initialize, make_mesh, opt_state_shardings
initialize(sys.argv[1], 2, int(sys.argv[2]))
from jax.experimental import multihost_utils
from jaxkv.config import ModelConfig
from jaxkv.cache.dense import KVCache
from jaxkv.model.decoder import forward, init_params, param_shardings, shard_params
from jaxkv.sharing import lckv
from jaxkv.train.config import TrainSection
from jaxkv.train.trainer import optimizer, train_step

cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64,
                  max_seq_len=32, kv_sources=lckv(4, 2))
params = init_params(cfg, jax.random.PRNGKey(0))  # the same on both processes
tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (4, 8), 0, 64, jnp.int32))
local = jax.jit(lambda p, t: forward(cfg, p, t, KVCache.init(cfg, 4, 16))[0])
want = np.asarray(local(params, tokens))
mesh = make_mesh("data=2,model=2")  # spans both processes' devices
batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data",)))
global_tokens = jax.make_array_from_callback(tokens.shape, batch, lambda index: tokens[index])
with jax.set_mesh(mesh):
    got = local(shard_params(params, cfg, mesh), global_tokens)
got = multihost_utils.process_allgather(got, tiled=True)

# one FSDP train step across the processes: the same loss as alone
tx = optimizer(TrainSection(warmup_steps=0))
step = jax.jit(lambda state, rows: train_step(state, rows, model_cfg=cfg, tx=tx, grad_accum=1, remat=False)[1])
state = {"params": params, "opt_state": tx.init(params)}
want_loss = float(step(state, tokens)["loss"])
fsdp = make_mesh("fsdp=4")
p_sh = param_shardings(cfg, fsdp)
state = jax.device_put(state, {"params": p_sh, "opt_state": opt_state_shardings(tx, params, p_sh, fsdp)})
rows = jax.make_array_from_callback(tokens.shape, jax.sharding.NamedSharding(fsdp, jax.sharding.PartitionSpec("fsdp")),
                                    lambda index: tokens[index])
with jax.set_mesh(fsdp):
    loss = float(step(state, rows)["loss"].addressable_data(0))  # replicated: every process holds it
print("REPORT " + json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                              "devices": jax.device_count(), "local": jax.local_device_count(),
                              "diff": float(np.max(np.abs(np.asarray(got) - want))),
                              "loss_diff": abs(loss - want_loss)}))
'''


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent), env.get("PYTHONPATH", "")])
    return env


def _report(stdout: str) -> dict:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("REPORT "))[7:])


@pytest.fixture(scope="module")
def report() -> dict:
    script = SCRIPT.replace("GENERATE_PAIRS", repr(GENERATE))
    done = subprocess.run([sys.executable, "-c", script], env=_env(8), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return _report(done.stdout)


@pytest.mark.parametrize("model, mesh", GENERATE)
def test_sharded_greedy_generation_equals_exact_decoding(report, model, mesh):
    assert report[f"generate {model} {mesh}"]


def test_the_engine_serves_the_same_tokens_on_a_mesh_with_pools_split_by_kv_heads(report):
    assert report["engine"]
    assert report["engine pool ratio"] == 2  # 2 KV heads over model=2


def test_weights_shrink_per_device_as_the_mesh_says(report):
    assert report["q_proj ratio"] == 8  # embed over fsdp=2, heads over model=4


def test_pallas_kernel_runs_per_shard_and_matches_the_reference(report):
    assert report["kernel shard_map"]
    assert report["kernel diff"] < 1e-5


@pytest.mark.parametrize("model, mesh", [("standard", "data=8")] + [
    (model, mesh) for model in ("standard", "cla2", "lckv") for mesh in ("fsdp=4,model=2", "data=2,seq=2,model=2")])
def test_sharded_train_step_equals_one_device(report, model, mesh):
    diffs = report[f"train {model} {mesh}"]
    # Adam divides by sqrt(v): where a gradient is ~0, float noise moves a weight by up to ~lr; 1% of lr here
    assert diffs["loss"] < 1e-5 and diffs["grad_norm"] < 1e-4 and diffs["params"] < 1e-4, diffs


def test_the_trainer_on_a_mesh_matches_one_device_and_resumes(report):
    """`train(config, mesh=...)`: state placed by the rules, batches split, an Orbax checkpoint of the
    sharded state restored into it."""
    assert report["trainer"]["steps"]
    assert report["trainer"]["loss"] < 1e-4  # 6 AdamW steps and 2 evaluations, loss and val_loss
    assert report["trainer"]["resumed"] < 1e-6


def test_two_processes_on_the_distributed_runtime_match_one(tmp_path):
    """2 processes x 2 CPU devices on 127.0.0.1 (gloo collectives): an LCKV forward sharded over the
    4 global devices, and an FSDP train step, equal each process's own single-device results."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS, f"127.0.0.1:{port}", str(i)], env=_env(2),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    reports = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        reports.append(_report(stdout))
    assert sorted(r["process"] for r in reports) == [0, 1]
    for r in reports:
        assert (r["processes"], r["devices"], r["local"]) == (2, 4, 2)
        assert r["diff"] < 1e-5 and r["loss_diff"] < 1e-5
