"""The LCKV authors' checkpoint format (LCKVLlamaForCausalLM) in and out of jaxkv, against a literal PyTorch
implementation of their forward (tests/lckv_reference.py): their checkpoints load with equal logits under their
iteration plan, jaxkv's KV-sharing models export so that their forward computes jaxkv's logits, and decoding
token by token equals their parallel forward once it has converged."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import jaxkv
from conftest import relative_error, write_tiny_hf_model
from jaxkv.api import LLM
from jaxkv.cache.dense import KVCache
from jaxkv.checkpoints.export import export_hf
from jaxkv.errors import JaxkvError
from jaxkv.generate.sampling import SamplingParams
from jaxkv.model.decoder import forward
from jaxkv.model.uptrain import share_kv
from jaxkv.sharing import from_string
from lckv_reference import LCKVLlama

N_LAYERS = 7
TWO_GROUPS = "0_2_2_3_5s_5_6"  # two separate upward groups, one of them through a window of 4
PROMPT = [int(t) for t in np.random.default_rng(7).integers(0, 256, size=18)]  # longer than m + b = 3 passes


def write_authors_checkpoint(directory: Path, layer_types: str, forward_passes=2, backward_passes=1,
                             sliding_window=4, **extra) -> Path:
    """A random Llama written by transformers, rewritten as the authors' code saves an LCKV model: their config
    fields, and no k_proj/v_proj in layers that read another layer's KV."""
    write_tiny_hf_model(directory, "llama-bias", num_hidden_layers=N_LAYERS)
    config = json.loads((directory / "config.json").read_text())
    config.update(architectures=["LCKVLlamaForCausalLM"], model_type="lckv-llama", layer_types=layer_types,
                  forward_passes=forward_passes, backward_passes=backward_passes, sliding_window=sliding_window,
                  use_sequential=False, force_nodiag=False, **extra)
    (directory / "config.json").write_text(json.dumps(config))
    model = next(directory.glob("*.safetensors"))
    tensors = load_file(str(model))
    sources = from_string(layer_types).sources
    keep = {k: v for k, v in tensors.items()
            if not any(k.startswith(f"model.layers.{i}.self_attn.{p}_proj") for i, s in enumerate(sources) if s != i
                       for p in "kv")}
    model.unlink()
    save_file(keep, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def jaxkv_logits(llm, ids, **changes) -> np.ndarray:
    cfg = llm.config.replace(**changes)
    return np.asarray(forward(cfg, llm.params, np.array([ids]), KVCache.init(cfg, 1, 64))[0][0])


@pytest.fixture(scope="module")
def authors(tmp_path_factory):
    directory = write_authors_checkpoint(tmp_path_factory.mktemp("lckv"), TWO_GROUPS)
    return LCKVLlama(directory), jaxkv.load(str(directory))


def test_authors_config_becomes_the_jaxkv_map(authors):
    _, llm = authors
    cfg = llm.config
    assert cfg.kv_sources == (0, 2, 2, 3, 5, 5, 6) and cfg.window_layers == (4,) and cfg.sliding_window == 4
    assert (cfg.upward_passes_no_grad, cfg.upward_passes_grad, cfg.upward_schedule) == (2, 1, "per_group")
    assert "k_proj" not in llm.params["layers_1"]["attn"] and "k_proj" in llm.params["layers_2"]["attn"]


def test_authors_checkpoint_logits_match_their_forward(authors):
    """Their iteration plan with m + b = 3 passes on an 18-token prompt (far from converged): jaxkv's per-group
    schedule computes it; the joint schedule does not; with 18 passes both reach the converged forward."""
    reference, llm = authors
    want = reference.logits(PROMPT).numpy()
    got = jaxkv_logits(llm, PROMPT)
    assert relative_error(got, want) < 1e-4, "per_group schedule differs from the authors' iteration plan"
    assert relative_error(jaxkv_logits(llm, PROMPT, upward_schedule="joint"), want) > 1e-3, \
        "the joint schedule should differ from the authors' plan when passes < tokens"
    converged = reference.logits(PROMPT, passes=len(PROMPT)).numpy()
    for schedule in ("per_group", "joint"):
        got = jaxkv_logits(llm, PROMPT, upward_schedule=schedule, upward_passes_no_grad=len(PROMPT) - 1,
                           upward_passes_grad=1)
        assert relative_error(got, converged) < 1e-4, f"{schedule}: not converged after {len(PROMPT)} passes"


def test_decoding_equals_their_converged_forward(authors):
    """Greedy tokens through the paged engine (prefill with passes enough to converge, then token by token) are
    the argmax of the authors' parallel forward run to convergence on the growing sequence: the paper's decoding
    (their published decode path drops the previous token's top-layer KV, see the jaxkv guide)."""
    reference, llm = authors
    exact = LLM(llm.config.replace(upward_passes_no_grad=len(PROMPT)), llm.tokenizer, llm.params)  # prefill exact
    got = exact.generate_ids([PROMPT], 10, SamplingParams(), ignore_eos=True)[0].token_ids
    seq = list(PROMPT)
    for _ in range(10):
        seq.append(int(reference.logits(seq, passes=len(seq))[-1].argmax()))
    assert got == seq[len(PROMPT):]


def test_sharing_model_exports_in_the_authors_format(tmp_path):
    """A Llama uptrained to a two-group map with a window layer exports as LCKVLlamaForCausalLM: their config fields,
    no K/V projections where a layer reads another's, and their forward computes jaxkv's logits; it loads back
    into jaxkv unchanged."""
    write_tiny_hf_model(tmp_path / "hf", "llama-bias", num_hidden_layers=N_LAYERS)
    llm = jaxkv.load(str(tmp_path / "hf"))
    layer_map = from_string(TWO_GROUPS)
    cfg, params = share_kv(llm.config.replace(sliding_window=4, upward_passes_no_grad=3, upward_passes_grad=2),
                           llm.params, layer_map.sources, layer_map.windowed)
    out = export_hf(LLM(cfg, llm.tokenizer, params), tmp_path / "lckv")
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("architectures", "model_type", "layer_types", "forward_passes",
                                   "backward_passes", "sliding_window", "use_sequential", "force_nodiag")} == {
        "architectures": ["LCKVLlamaForCausalLM"], "model_type": "lckv-llama", "layer_types": TWO_GROUPS,
        "forward_passes": 3, "backward_passes": 2, "sliding_window": 4, "use_sequential": False,
        "force_nodiag": False}
    reference = LCKVLlama(out)
    assert "model.layers.1.self_attn.k_proj.weight" not in reference.w
    assert "model.layers.2.self_attn.k_proj.weight" in reference.w
    want = reference.logits(PROMPT).numpy()
    assert relative_error(jaxkv_logits(LLM(cfg, llm.tokenizer, params), PROMPT), want) < 1e-4
    back = jaxkv.load(str(out))
    assert back.config.replace(name=cfg.name) == cfg
    assert jax.tree.structure(back.params) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back.params, params)


def test_other_families_with_shared_kv_are_refused(tmp_path):
    write_tiny_hf_model(tmp_path / "hf", "qwen3")
    llm = jaxkv.load(str(tmp_path / "hf"))
    cfg, params = share_kv(llm.config, llm.params, (0, 0, 2))
    with pytest.raises(JaxkvError, match=r"only Llama-family models export so, as the LCKV authors' "
                                         r"LCKVLlamaForCausalLM; HF's qwen3 has no such layers"):
        export_hf(LLM(cfg, llm.tokenizer, params), tmp_path / "cla")
    assert not (tmp_path / "cla").exists()


@pytest.mark.parametrize("change, message", [
    (dict(force_nodiag=True), r"force_nodiag=true \(every layer masks its diagonal\) is not supported"),
    (dict(layer_types="0_0_2"), r"layer_types has 3 layers, num_hidden_layers is 7"),
    (dict(layer_types=[0, 0, 2, 2, 4, 4, 6]), r"layer_types must be an underscore string"),
    (dict(layer_types="0_x_2_2_4_4_6"), r"layer_types: bad KV-sharing string"),
    (dict(layer_types="0_2_1_3_4_5_6"), r"layer 1 reads the KV of layer 2, which does not produce KV itself"),
])
def test_bad_authors_configs_are_one_line(tmp_path, change, message):
    directory = write_authors_checkpoint(tmp_path, TWO_GROUPS)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(JaxkvError, match=message) as err:
        jaxkv.load(str(directory))
    assert "\n" not in str(err.value)


def test_torch_reference_follows_transformers_llama_for_the_standard_map(tmp_path):
    """The reference's layers are transformers' Llama when nothing is shared (so its LCKV parts are all that
    the format tests add)."""
    hf_model = write_tiny_hf_model(tmp_path, "llama-bias", num_hidden_layers=N_LAYERS)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(architectures=["LCKVLlamaForCausalLM"], model_type="lckv-llama",
                  layer_types="_".join(map(str, range(N_LAYERS))))
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = {}
    for f in tmp_path.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
        f.unlink()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with torch.no_grad():
        want = hf_model(torch.tensor([PROMPT])).logits[0].numpy()
    assert relative_error(LCKVLlama(tmp_path).logits(PROMPT).numpy(), want) < 1e-5
