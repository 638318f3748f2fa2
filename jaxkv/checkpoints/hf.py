"""Read an HF checkpoint directory (a family `hf_config` knows): config.json + (sharded) safetensors."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from jaxkv.checkpoints.hf_config import family, model_config
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.tokenizer import Tokenizer


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
        family(self.hf_config, str(self.path / "config.json"))  # an unsupported architecture fails here, early
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
        return model_config(self.hf_config, name or self.path.name, str(self.path / "config.json"))

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
