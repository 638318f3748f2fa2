"""HF safetensors -> jaxkv checkpoint (Orbax) -> back: round trips, loading by path, damaged inputs."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch

import jaxkv
from conftest import relative_error
from jaxkv.cache.dense import KVCache
from jaxkv.checkpoints.hf import HFCheckpoint
from jaxkv.checkpoints.store import assemble_params, convert, load_checkpoint
from jaxkv.errors import JaxkvError
from jaxkv.model.decoder import forward


@pytest.fixture(scope="module")
def converted(tiny_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    convert(HFCheckpoint(tiny_hf_dir), out)
    return out


def test_sharded_hf_checkpoint_is_read_whole(tiny_hf_dir):
    assert len(list(tiny_hf_dir.glob("*.safetensors"))) > 1  # the fixture really is sharded
    source = HFCheckpoint(tiny_hf_dir)
    names = {name for name, _ in source.tensors()}
    assert len(names) == len(source) == 2 + 1 + 3 * 9  # embed, norm, lm_head + 9 per layer


def test_orbax_round_trip_keeps_every_parameter(tiny_hf_dir, converted):
    source = HFCheckpoint(tiny_hf_dir)
    direct = assemble_params(source.model_config(), source, "float32")
    cfg, tokenizer, restored = load_checkpoint(converted)
    assert cfg == source.model_config().replace(name=cfg.name)
    jax.tree.map(np.testing.assert_array_equal, restored, direct)
    assert tokenizer.encode("round trip") == source.tokenizer().encode("round trip")


def test_converted_model_matches_transformers(tiny_hf_dir, converted):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    llm = jaxkv.load(str(converted))
    tokens = np.arange(1, 30)[None]
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    got, _ = forward(llm.config, llm.params, tokens, KVCache.init(llm.config, 1, 32))
    assert relative_error(got, want) < 1e-4


def test_load_by_any_path_gives_the_same_generation(tiny_hf_dir, converted):
    from_hf = jaxkv.load(str(tiny_hf_dir)).generate("same", max_new_tokens=6)
    from_ckpt = jaxkv.load(str(converted)).generate("same", max_new_tokens=6)
    assert from_hf.token_ids == from_ckpt.token_ids


def test_bfloat16_conversion(tiny_hf_dir, tmp_path):
    convert(HFCheckpoint(tiny_hf_dir), tmp_path, dtype="bfloat16")
    cfg, _, params = load_checkpoint(tmp_path)
    assert cfg.param_dtype == "bfloat16"
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}
    assert jaxkv.load(str(tmp_path), dtype="float32").params["embed"]["embedding"].dtype == np.float32


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_damaged_checkpoints_give_clear_errors(converted, tmp_path):
    broken = _copy(converted, tmp_path / "no_params_data")
    for f in (broken / "params").rglob("*"):
        if f.is_file() and f.name not in ("_METADATA", "_CHECKPOINT_METADATA"):
            f.write_bytes(b"garbage")
    with pytest.raises(JaxkvError, match="cannot restore parameters"):
        load_checkpoint(broken)

    wrong_shape = _copy(converted, tmp_path / "wrong_config")
    cfg = json.loads((wrong_shape / "config.json").read_text())
    (wrong_shape / "config.json").write_text(json.dumps({**cfg, "n_layers": 2, "kv_sources": [0, 1]}))
    with pytest.raises(JaxkvError, match="does not match the model"):
        load_checkpoint(wrong_shape)

    bad_json = _copy(converted, tmp_path / "bad_json")
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(JaxkvError, match="cannot read model config"):
        load_checkpoint(bad_json)


def test_bad_hf_directories(tiny_hf_dir, tmp_path):
    arch = _copy(tiny_hf_dir, tmp_path / "gpt2")
    cfg = json.loads((arch / "config.json").read_text())
    (arch / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(JaxkvError, match="unsupported architecture 'GPT2LMHeadModel'"):
        HFCheckpoint(arch)

    missing = _copy(tiny_hf_dir, tmp_path / "missing_shard")
    next(missing.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(JaxkvError, match="missing weight shard"):
        HFCheckpoint(missing)

    truncated = _copy(tiny_hf_dir, tmp_path / "truncated")
    shard = next(truncated.glob("model-00001-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(JaxkvError, match="cannot read weights"):
        jaxkv.load(str(truncated))

    with pytest.raises(JaxkvError, match="neither a jaxkv checkpoint"):
        jaxkv.load(str(tmp_path / "missing_shard" / ".."))  # a directory with no config.json


def test_failed_conversion_keeps_the_existing_checkpoint(tiny_hf_dir, converted, tmp_path):
    target = _copy(converted, tmp_path / "existing")
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    broken = _copy(tiny_hf_dir, tmp_path / "broken_src")
    shard = next(broken.glob("model-00002-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(JaxkvError, match="cannot read weights"):
        convert(HFCheckpoint(broken), target)
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no scratch left behind


def test_convert_refuses_to_overwrite_other_data(tiny_hf_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(JaxkvError, match="refusing to overwrite"):
        convert(HFCheckpoint(tiny_hf_dir), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
