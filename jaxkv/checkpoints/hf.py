"""Read an HF Llama-family checkpoint directory: config.json + (sharded) safetensors."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from jaxkv.config import ModelConfig, RopeScaling
from jaxkv.errors import JaxkvError
from jaxkv.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


@contextlib.contextmanager
def _open_shard(path: Path):
    try:
        with safe_open(path, framework="np") as st:
            yield st
    except (OSError, SafetensorError) as e:
        raise JaxkvError(f"cannot read weights {path}: {e}") from None


class HFCheckpoint:
    """An HF model directory, read tensor by tensor so a large model never sits whole in RAM."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.hf_config = json.loads((self.path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise JaxkvError(f"cannot read HF config {self.path / 'config.json'}: {e}") from None
        archs = self.hf_config.get("architectures") or [self.hf_config.get("model_type", "?")]
        if not any(a in SUPPORTED_ARCHITECTURES or a in ("llama", "mistral") for a in archs):
            raise JaxkvError(f"unsupported architecture {archs[0]!r} in {self.path} "
                             f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        for flag in ("attention_bias", "mlp_bias"):
            if self.hf_config.get(flag):
                raise JaxkvError(f"{self.path}: {flag}=true is not supported (Llama-family models have no biases)")
        self.files = self._weight_files()

    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise JaxkvError(f"cannot read {index}: {e}") from None
            files = [self.path / f for f in dict.fromkeys(weight_map.values())]
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise JaxkvError(f"no safetensors weights in {self.path}")
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise JaxkvError(f"missing weight shard(s): {', '.join(missing)}")
        return files

    def model_config(self, name: str | None = None) -> ModelConfig:
        c = self.hf_config
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                                  high_freq_factor=rope["high_freq_factor"],
                                  original_max_position_embeddings=rope["original_max_position_embeddings"])
        elif rope_type != "default":
            raise JaxkvError(f"{self.path}: RoPE type {rope_type!r} is not supported (supported: default, llama3)")
        heads = c["num_attention_heads"]
        try:
            return ModelConfig(
                name=name or self.path.name,
                vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
                n_heads=heads, n_kv_heads=c.get("num_key_value_heads") or heads,
                head_dim=c.get("head_dim") or c["hidden_size"] // heads, mlp_dim=c["intermediate_size"],
                rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))), rope_scaling=scaling,
                norm_eps=c.get("rms_norm_eps", 1e-6), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                max_seq_len=c.get("max_position_embeddings", 2048),
            )
        except KeyError as e:
            raise JaxkvError(f"{self.path / 'config.json'} lacks {e}") from None

    def __len__(self) -> int:
        total = 0
        for f in self.files:
            with _open_shard(f) as st:
                total += len(st.keys())
        return total

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for f in self.files:
            with _open_shard(f) as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.path)
