"""Training end to end on a tiny Llama and a small synthetic corpus: the loss falls,
accumulation equals one big batch, an interrupted run resumes to the same losses, and the
final checkpoint generates. Each run trains its own small BPE tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import yaml

import jaxkv
from conftest import write_text_corpus
from jaxkv.checkpoints.store import load_checkpoint, save_checkpoint
from jaxkv.config import ModelConfig
from jaxkv.data.tokens import train_bpe
from jaxkv.errors import JaxkvError
from jaxkv.model.decoder import init_params
from jaxkv.train import TrainConfig, train
from jaxkv.train.trainer import train_step

MICRO = {"name": "micro", "vocab_size": 300, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1,
         "head_dim": 16, "mlp_dim": 64, "max_seq_len": 64}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus of six documents (the last held out) and the micro model's config file."""
    root = tmp_path_factory.mktemp("train")
    files = write_text_corpus(root / "corpus")
    (root / "micro.yaml").write_text(yaml.safe_dump({"model": MICRO}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAXKV_HOME", str(root / "home"))  # for the token cache
        yield root, files


def config(setup, out: str, train_: dict | None = None, **sections) -> dict:
    root, files = setup
    return {
        "model": {"config": str(root / "micro.yaml")},
        "tokenizer": {"train_bpe": 300},
        "data": {"source": [str(root / "corpus" / "*.txt")], "validation": [str(files[-1])], "seq_len": 32},
        "train": {"steps": 30, "batch_size": 8, "lr": "3e-3", "warmup_steps": 5, "log_every": 1, "eval_every": 10,
                  "eval_batches": 2, **(train_ or {})},
        "checkpoint": {"every": 10, "keep": 2},
        "out": str(root / out),
        **sections,
    }


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_final_checkpoint_generates(setup):
    result = train(TrainConfig.from_dict(config(setup, "falls")))
    losses = [r["loss"] for r in metrics(result.out) if "loss" in r]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < losses[0] - 1.5, losses
    assert [e["step"] for e in result.evals] == [10, 20, 30]
    assert result.evals[-1]["val_loss"] < result.evals[0]["val_loss"]
    assert result.val_ppl == pytest.approx(np.exp(result.val_loss))
    assert sorted(int(p.name) for p in (result.out / "checkpoints").iterdir()) == [20, 30]  # keep: 2

    llm = jaxkv.load(result.final)
    assert llm.config.vocab_size == llm.tokenizer.vocab_size
    assert result.parameters == sum(int(np.size(p)) for p in jax.tree.leaves(llm.params))
    out = llm.generate("the king", max_new_tokens=6)
    assert len(out.token_ids) <= 6 and out.text.strip()
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"} <= set(metrics(result.out)[0])


def test_grad_accum_equals_one_big_batch(setup):
    """The train step: grads of 4 microbatches of 2 equal those of the batch of 8 (plain SGD
    makes the update the gradient); a whole 1-step run: the same AdamW update and loss."""
    cfg = ModelConfig(**MICRO)
    params = init_params(cfg, jax.random.PRNGKey(0))
    rows = jax.random.randint(jax.random.PRNGKey(1), (8, 17), 0, cfg.vocab_size)
    tx = optax.sgd(1.0)
    results = [train_step({"params": params, "opt_state": tx.init(params)}, rows, model_cfg=cfg, tx=tx,
                          grad_accum=k, remat=False) for k in (1, 4)]
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)

    runs = [train(TrainConfig.from_dict(config(setup, f"accum{k}", {"steps": 1, "grad_accum": k}))) for k in (1, 4)]
    (l1,), (l4,) = ([r["loss"] for r in metrics(run.out) if "loss" in r] for run in runs)
    assert l1 == pytest.approx(l4, abs=1e-5)
    p1, p4 = (load_checkpoint(run.final)[2] for run in runs)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_interrupted_run_resumes_exactly(setup):
    settings = {"steps": 12, "eval_every": 6}
    whole = train(TrainConfig.from_dict(config(setup, "whole", settings, checkpoint={"every": 4, "keep": 3})))

    def interrupt(record):
        if record["step"] == 6 and "loss" in record:
            raise KeyboardInterrupt  # as Ctrl-C or a preemption would, after the checkpoint of step 4

    cut = TrainConfig.from_dict(config(setup, "cut", settings, checkpoint={"every": 4, "keep": 3}))
    with pytest.raises(KeyboardInterrupt):
        train(cut, callback=interrupt)
    assert [r["step"] for r in metrics(Path(cut.out))][-1] == 6
    assert not (Path(cut.out) / "final").exists()
    resumed = train(cut)

    ours, theirs = metrics(resumed.out), metrics(whole.out)
    assert [(r["step"], "loss" in r) for r in ours] == [(r["step"], "loss" in r) for r in theirs]  # no duplicates
    for a, b in zip(ours, theirs):
        for key in ("loss", "grad_norm", "lr", "val_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-6), (a, b)
    for a, b in zip(jax.tree.leaves(load_checkpoint(resumed.final)[2]), jax.tree.leaves(load_checkpoint(whole.final)[2])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)

    with pytest.raises(JaxkvError, match="past train.steps 5"):
        train(cut, steps=5)
    other_batch = TrainConfig.from_dict(config(setup, "cut", {**settings, "batch_size": 4}))
    with pytest.raises(JaxkvError, match="in batches of 8; this config gives .* in batches of 4"):
        train(other_batch, steps=20)


def test_bf16_compute_keeps_float32_state(setup):
    result = train(TrainConfig.from_dict(config(setup, "bf16", {"steps": 2, "compute_dtype": "bfloat16"})))
    assert np.isfinite(result.loss)
    state = ocp.StandardCheckpointer().restore(result.out / "checkpoints" / "2" / "state")
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert len(floats) == 3 * len(jax.tree.leaves(state["params"]))  # params, Adam's mu and nu
    assert {x.dtype for x in floats} == {np.dtype("float32")}
    cfg, _, params = load_checkpoint(result.final)
    assert (cfg.dtype, cfg.param_dtype) == ("float32", "float32")


def test_init_from_checkpoint_and_kv_sharing(setup, tmp_path):
    """Uptraining from a jaxkv checkpoint into CLA uses its tokenizer and K/V-averaged weights; a
    tokenizer larger than the model's vocabulary is refused; an upward KV map (LCKV) trains from
    scratch and is kept in the final config."""
    root, files = setup
    tokenizer = train_bpe((f.read_text() for f in files), 280)
    cfg = ModelConfig(**{**MICRO, "vocab_size": tokenizer.vocab_size})
    save_checkpoint(tmp_path / "base", cfg, tokenizer, init_params(cfg, jax.random.PRNGKey(3)))
    base = {"init_from": str(tmp_path / "base")}
    uptrain = {**config(setup, "uptrain", {"steps": 2}), "model": {**base, "kv_sharing": "cla2"}, "tokenizer": None}
    final_cfg, final_tokenizer, _ = load_checkpoint(train(TrainConfig.from_dict(uptrain)).final)
    assert final_tokenizer.hf.to_str() == tokenizer.hf.to_str()  # the model's own
    assert final_cfg.kv_sources == (0, 0) and final_cfg.vocab_size == cfg.vocab_size

    bigger = train_bpe((f.read_text() for f in files), 300)  # a tokenizer named by its checkpoint
    big_cfg = ModelConfig(**{**MICRO, "vocab_size": bigger.vocab_size})
    save_checkpoint(tmp_path / "bigger", big_cfg, bigger, init_params(big_cfg, jax.random.PRNGKey(3)))
    with pytest.raises(JaxkvError, match="more than the vocab_size"):
        train(TrainConfig.from_dict({**config(setup, "too-big", {"steps": 2}), "model": base,
                                     "tokenizer": str(tmp_path / "bigger")}))

    lckv = {"config": str(root / "micro.yaml"), "kv_sharing": "1_1", "upward_passes": [2, 1]}
    result = train(TrainConfig.from_dict(config(setup, "lckv", {"steps": 3}, model=lckv)))
    final_cfg = load_checkpoint(result.final)[0]
    assert final_cfg.kv_sources == (1, 1) and (final_cfg.upward_passes_no_grad, final_cfg.upward_passes_grad) == (2, 1)
    assert np.isfinite(result.loss) and result.kv_bytes_per_token == jaxkv.kv_bytes_per_token(final_cfg)


@pytest.mark.parametrize("name", ["tiny-shakespeare", "smollm2-uptrain-cla2"])
def test_shipped_configs_parse(name):
    cfg = TrainConfig.load(Path(__file__).parents[1] / "configs" / "train" / f"{name}.yaml")
    assert cfg.train.lr > 0 and (cfg.model.config or cfg.model.init_from)


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "unknown train config section 'colour'"),
    ({"train": {"lrr": 1}}, r"unknown key train.lrr \(known: steps, "),
    ({"train": {"lr": "fast"}}, "train.lr must be a number, got 'fast'"),
    ({"train": {"batch_size": 6, "grad_accum": 4}}, "must be a multiple of train.grad_accum"),
    ({"train": {"compute_dtype": "int8"}}, "train.compute_dtype must be one of"),
    ({"model": {"config": "x", "init_from": "y"}}, "exactly one of config"),
    ({"model": {"config": "x", "upward_passes": [1]}}, "two integers"),
    ({"tokenizer": None}, "needs a tokenizer"),
    ({"tokenizer": {"train_bpe": 0}}, "positive vocabulary size"),
    ({"tokenizer": {"bpe": 10}}, "tokenizer must be"),
    ({"data": {"source": ["a.txt"], "validation": ["b.txt"], "validation_fraction": 0.1}}, "alternatives"),
    ({"checkpoint": {"keep": 0}}, "checkpoint.keep must be positive"),
    ({"out": None}, "needs a out section"),
])
def test_bad_config_is_one_line(setup, change, message):
    data = {**config(setup, "bad"), **change}
    with pytest.raises(JaxkvError, match=message) as info:
        TrainConfig.from_dict(data)
    assert "\n" not in str(info.value)


def test_seq_len_beyond_the_model_is_refused(setup):
    with pytest.raises(JaxkvError, match="data.seq_len 128 exceeds the model's max_seq_len 64"):
        train(TrainConfig.from_dict(config(setup, "long", data={**config(setup, "x")["data"], "seq_len": 128})))


def test_cli_train_end_to_end(setup, tmp_path):
    jaxkv_cli = str(Path(sys.executable).parent / "jaxkv")
    env = {k: v for k, v in os.environ.items() if k != "JAXKV_DEBUG"}
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(config(setup, "cli", {"steps": 50, "eval_every": 0})))
    proc = subprocess.run([jaxkv_cli, "train", "--config", str(good), "--steps", "3", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {tmp_path / 'run' / 'final'}: step 3" in proc.stderr
    assert [r["step"] for r in metrics(tmp_path / "run") if "loss" in r] == [1, 2, 3]

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**config(setup, "cli"), "train": {"stepz": 3}}))
    proc = subprocess.run([jaxkv_cli, "train", "--config", str(bad)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxkv: error: unknown key train.stepz (known: steps, "), lines
