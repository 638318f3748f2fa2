"""Write a jaxkv model as an HF checkpoint that transformers loads: config.json in its family's fields,
model.safetensors in PyTorch's layout, the tokenizer files and generation_config.json."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.numpy import save_file

from jaxkv.checkpoints.hf_config import hf_config_dict
from jaxkv.checkpoints.hf_layout import params_to_hf
from jaxkv.errors import JaxkvError


def export_target(out: str | Path) -> Path:
    """`out` as an absolute path, if nothing would be lost by writing there (callers check before long work)."""
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise JaxkvError(f"refusing to overwrite {out}: it exists and is not empty")
    return out


def export_hf(llm, out: str | Path) -> Path:
    """`llm` (a standard-map model of any supported family) as an HF directory at `out`, in its parameter dtype.
    The directory is built beside `out` and moved into place when complete; an existing non-empty `out` is
    refused, not overwritten."""
    out = export_target(out)
    tokenizer = llm.tokenizer
    config = hf_config_dict(llm.config, tokenizer.bos_id, tokenizer.eos_ids)  # fails before any writing
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.exporting-") as work:
        built = Path(work) / "hf"
        built.mkdir()
        save_file(dict(params_to_hf(llm.params, llm.config)), str(built / "model.safetensors"),
                  metadata={"format": "pt"})
        (built / "config.json").write_text(json.dumps(config, indent=2))
        (built / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, indent=2))
        tokenizer.save(built)
        if out.exists():
            shutil.rmtree(out)
        os.replace(built, out)
    return out
