"""GGUFCheckpoint against independent truths: transformers' GGUF loader on the real SmolLM2 file,
hand-decoded quantization blocks, llama.cpp's own Q/K permutation and rope_freqs formula."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from jaxkv.checkpoints.gguf import GGUFCheckpoint
from jaxkv.config import RopeScaling
from jaxkv.errors import JaxkvError

Q = gguf.GGMLQuantizationType
# Tiny geometry: rows of 256 so every block size (32, and 256 for K-quants) divides them;
# mlp != d_model so a transposed tensor cannot pass.
VOCAB, D, H, KV, DH, MLP, LAYERS = 32, 256, 4, 2, 64, 512, 2


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(rng: np.random.Generator, tied: bool = True) -> dict[str, np.ndarray]:
    """Random HF-named float32 weights of the tiny geometry."""
    shapes = {"model.embed_tokens.weight": (VOCAB, D), "model.norm.weight": (D,)}
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, D)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                   p + "self_attn.q_proj.weight": (H * DH, D), p + "self_attn.k_proj.weight": (KV * DH, D),
                   p + "self_attn.v_proj.weight": (KV * DH, D), p + "self_attn.o_proj.weight": (D, H * DH),
                   p + "mlp.gate_proj.weight": (MLP, D), p + "mlp.up_proj.weight": (MLP, D),
                   p + "mlp.down_proj.weight": (D, MLP)}
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def gguf_name(hf: str) -> str:
    """HF -> GGUF tensor name, written out independently of the reader's table."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, i, rest = hf.split(".", 3)
    part = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
            "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}[rest[:-len(".weight")]]
    return f"blk.{i}.{part}.weight"


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, Q]], arch: str = "llama", **meta) -> Path:
    """A GGUF of the tiny geometry; `tensors` maps GGUF name -> (float32 array or raw bytes, type).
    `meta` overrides/extends llama.* keys (None removes one)."""
    w = gguf.GGUFWriter(path, arch)
    keys = {"block_count": LAYERS, "context_length": 512, "embedding_length": D, "feed_forward_length": MLP,
            "attention.head_count": H, "attention.head_count_kv": KV, "rope.freq_base": 500000.0,
            "attention.layer_norm_rms_epsilon": 1e-5, "vocab_size": VOCAB} | meta
    for key, value in keys.items():
        if value is None:
            continue
        add = {str: w.add_string, float: w.add_float32, int: w.add_uint32}[type(value)]
        add(f"{arch}.{key}", value)
    w.add_name("tiny")
    for name, (array, qtype) in tensors.items():
        if array.dtype == np.uint8:  # already raw bytes of `qtype`
            w.add_tensor(name, array, raw_dtype=qtype)
        elif qtype == Q.F32:
            w.add_tensor(name, array)
        else:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_gguf(path: Path, weights: dict[str, np.ndarray], qtype: Q = Q.F32, **meta) -> Path:
    """Store HF weights the way llama.cpp does: GGUF names, Q/K permuted, norms in F32."""
    tensors = {}
    for name, array in weights.items():
        if "q_proj" in name:
            array = llama_cpp_permute(array, H)
        elif "k_proj" in name:
            array = llama_cpp_permute(array, KV)
        tensors[gguf_name(name)] = (array, Q.F32 if array.ndim == 1 else qtype)
    return write_gguf(path, tensors, **meta)


# --- synthetic files ------------------------------------------------------------------------------

def test_f32_roundtrip_undoes_permutation_and_keeps_layout(tmp_path):
    weights = hf_weights(np.random.default_rng(0))
    ckpt = GGUFCheckpoint(llama_gguf(tmp_path / "m.gguf", weights))
    got = dict(ckpt.tensors())
    assert got.keys() == weights.keys()  # tied: no lm_head.weight
    for name, array in got.items():
        assert array.dtype == np.float32 and array.flags.writeable
        np.testing.assert_array_equal(array, weights[name], err_msg=name)
    assert len(ckpt) == len(weights)


def test_untied_output_becomes_lm_head(tmp_path):
    weights = hf_weights(np.random.default_rng(1), tied=False)
    ckpt = GGUFCheckpoint(llama_gguf(tmp_path / "m.gguf", weights))
    assert ckpt.model_config().tie_embeddings is False
    np.testing.assert_array_equal(dict(ckpt.tensors())["lm_head.weight"], weights["lm_head.weight"])


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_dequantized_within_quantization_error(tmp_path, qtype):
    weights = hf_weights(np.random.default_rng(2))
    ckpt = GGUFCheckpoint(llama_gguf(tmp_path / "m.gguf", weights, qtype))
    for name, got in ckpt.tensors():
        want = weights[name]
        if want.ndim == 1:
            np.testing.assert_array_equal(got, want)
            continue
        blocks = want.reshape(-1, 32)
        absmax, span = np.abs(blocks).max(1, keepdims=True), np.ptp(blocks, 1, keepdims=True)
        step = {Q.F16: 2**-10 * np.abs(blocks), Q.BF16: 2**-7 * np.abs(blocks), Q.Q8_0: absmax / 127,
                Q.Q4_0: absmax / 4, Q.Q4_1: span / 15}[qtype]  # Q4_0 clamps one side to 7/8
        err = np.abs(got.reshape(-1, 32) - blocks)
        assert (err <= step + 1e-6).all(), f"{name}: max error {err.max()}"


def test_hand_built_blocks_decode_per_ggml_spec(tmp_path):
    """Raw Q8_0 / Q4_0 / Q4_1 bytes decoded by the spec, not by gguf.quants."""
    rng = np.random.default_rng(3)
    rows = VOCAB * D // 32  # token_embd [VOCAB, D] as 32-element blocks
    d = rng.uniform(0.01, 0.1, rows).astype(np.float16)
    m = rng.uniform(-1, 1, rows).astype(np.float16)
    nibbles = rng.integers(0, 256, (rows, 16), dtype=np.uint8)
    q8 = rng.integers(-128, 128, (rows, 32), dtype=np.int8)

    def raw(*parts):
        return np.concatenate([p.reshape(rows, -1).view(np.uint8) for p in parts], 1).reshape(VOCAB, -1)

    lo, hi = (nibbles & 0xF).astype(np.float32), (nibbles >> 4).astype(np.float32)
    d32, m32 = d.astype(np.float32)[:, None], m.astype(np.float32)[:, None]
    cases = {
        Q.Q8_0: (raw(d, q8), d32 * q8),
        Q.Q4_0: (raw(d, nibbles), d32 * (np.concatenate([lo, hi], 1) - 8)),
        Q.Q4_1: (raw(d, m, nibbles), d32 * np.concatenate([lo, hi], 1) + m32),
    }
    for qtype, (data, want) in cases.items():
        path = write_gguf(tmp_path / f"{qtype.name}.gguf", {"token_embd.weight": (data, qtype)})
        (name, got), = GGUFCheckpoint(path).tensors()
        assert name == "model.embed_tokens.weight"
        np.testing.assert_allclose(got, want.reshape(VOCAB, D), rtol=1e-6, atol=1e-7, err_msg=qtype.name)


def test_model_config_from_metadata(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {}, **{"attention.key_length": 32, "rope.freq_base": None})
    cfg = GGUFCheckpoint(path).model_config()
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim) == \
        (VOCAB, D, LAYERS, H, KV, 32, MLP)
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len, cfg.name) == (10000.0, None, 512, "tiny")
    assert cfg.norm_eps == pytest.approx(1e-5) and cfg.tie_embeddings
    assert GGUFCheckpoint(path).model_config("mine").name == "mine"

    defaults = GGUFCheckpoint(write_gguf(tmp_path / "d.gguf", {}, **{"attention.head_count_kv": None}))
    cfg = defaults.model_config()
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta) == (H, D // H, 500000.0)


def llama_cpp_rope_freqs(factor, low_freq_factor, high_freq_factor, old_context_len, base, dim):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, verbatim in substance."""
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(rope_factors, dtype=np.float32)


@pytest.mark.parametrize("factor,low,high", [(8.0, 1.0, 4.0), (32.0, 1.0, 4.0), (16.0, 2.0, 8.0)])
def test_rope_freqs_tensor_maps_to_llama3_scaling(tmp_path, factor, low, high):
    freqs = llama_cpp_rope_freqs(factor, low, high, 8192, 500000.0, DH)
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "m.gguf", {"rope_freqs.weight": (freqs, Q.F32)}))
    assert ckpt.model_config().rope_scaling == RopeScaling(factor, low, high, 8192)
    assert list(ckpt.tensors()) == [] and len(ckpt) == 0  # consumed by the config, not a weight


@pytest.mark.parametrize("freqs", [np.linspace(1, 3, DH // 2), np.full(DH // 2, 2.0), np.ones(DH // 4)])
def test_rope_freqs_that_are_not_llama3_are_refused(tmp_path, freqs):
    path = write_gguf(tmp_path / "m.gguf", {"rope_freqs.weight": (freqs.astype(np.float32), Q.F32)})
    with pytest.raises(JaxkvError, match="rope_freqs"):
        GGUFCheckpoint(path).model_config()


def test_unit_rope_freqs_mean_no_scaling(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {"rope_freqs.weight": (np.ones(DH // 2, np.float32), Q.F32)})
    assert GGUFCheckpoint(path).model_config().rope_scaling is None


@pytest.mark.parametrize("meta, want", [
    ({"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}, RopeScaling(4.0, rope_type="linear")),
    ({"rope.scaling.factor": 4.0}, RopeScaling(4.0, rope_type="linear")),  # llama.cpp's default type
    ({"rope.scaling.type": "linear"}, None),  # no factor: llama.cpp scales by 1
    ({"rope.scaling.type": "none", "rope.scaling.factor": 4.0}, None),  # llama.cpp: never scale
])
def test_linear_rope_scaling_as_llama_cpp_reads_it(tmp_path, meta, want):
    assert GGUFCheckpoint(write_gguf(tmp_path / "m.gguf", {}, **meta)).model_config().rope_scaling == want


def test_other_rope_scaling_refused(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {}, **{"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0})
    with pytest.raises(JaxkvError, match="'yarn' is not supported"):
        GGUFCheckpoint(path).model_config()


def test_unsupported_quantization_type_named(tmp_path):
    q5k = np.zeros((VOCAB, D // 256 * gguf.GGML_QUANT_SIZES[Q.Q5_K][1]), np.uint8)
    path = write_gguf(tmp_path / "m.gguf", {"output_norm.weight": (np.ones(D, np.float32), Q.F32),
                                            "token_embd.weight": (q5k, Q.Q5_K)})
    with pytest.raises(JaxkvError, match=r"tensor token_embd.weight has quantization type Q5_K.*supported: F32"):
        next(GGUFCheckpoint(path).tensors())  # refused before the first tensor is converted


def test_unknown_tensor_refused(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {"blk.0.ffn_gate.bias": (np.zeros(MLP, np.float32), Q.F32)})
    with pytest.raises(JaxkvError, match="blk.0.ffn_gate.bias"):
        list(GGUFCheckpoint(path).tensors())


def test_other_architecture_refused(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {}, arch="gptneox")
    with pytest.raises(JaxkvError, match="'gptneox'"):
        GGUFCheckpoint(path)


def test_unreadable_files_are_one_line_errors(tmp_path):
    good = llama_gguf(tmp_path / "good.gguf", hf_weights(np.random.default_rng(4)), Q.Q8_0).read_bytes()
    files = {"missing.gguf": None, "empty.gguf": b"", "garbage.gguf": np.random.default_rng(5).bytes(4096),
             "header_only.gguf": good[:200], "half.gguf": good[: len(good) // 2], "short.gguf": good[:-100]}
    for name, data in files.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(JaxkvError, match=f"^cannot read GGUF file {path}: ") as e:
            GGUFCheckpoint(path)
        assert "\n" not in str(e.value), name


# --- the real SmolLM2 file against transformers' GGUF loader ------------------------------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> GGUFCheckpoint:
    return GGUFCheckpoint(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_reference(smollm2_gguf):
    """HF config and tensors from transformers' GGUF loader (the code from_pretrained(gguf_file=) runs;
    from_pretrained itself insists on `accelerate`, which only places weights)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = smollm2_gguf
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton,
                                   torch_dtype=torch.float32)["tensors"]
    return config, tensors


@pytest.mark.slow
def test_smollm2_tensors_match_transformers(smollm2, hf_reference):
    _, want = hf_reference
    seen = set()
    for name, got in smollm2.tensors():
        ref = want[name].numpy()
        assert got.shape == ref.shape and got.dtype == np.float32, name
        assert np.allclose(got, ref, rtol=0, atol=1e-6), name
        seen.add(name)
    assert seen == set(want) and len(smollm2) == len(seen)  # tied: HF has no separate lm_head either


@pytest.mark.slow
def test_smollm2_config_matches_transformers(smollm2, hf_reference):
    hf, _ = hf_reference
    cfg = smollm2.model_config()
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_dim, cfg.vocab_size, cfg.max_seq_len,
            cfg.tie_embeddings, cfg.head_dim) == \
        (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads,
         hf.intermediate_size, hf.vocab_size, hf.max_position_embeddings, hf.tie_word_embeddings, hf.head_dim)
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"] and cfg.rope_scaling is None
    assert cfg.norm_eps == hf.rms_norm_eps
    assert cfg.name == "Smollm2 135M 8k Lc100K Mix1 Ep2"


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2):
    tok = smollm2.tokenizer()
    assert tok.vocab_size == 49152 and tok.encode("<|im_start|>user") == [1, 4093]
