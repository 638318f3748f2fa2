"""scripts/compare_kv_sharing.py end to end on a tiny corpus: table, plot and resumable runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_text_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_comparison_writes_table_and_plot(tmp_path):
    files = write_text_corpus(tmp_path / "corpus", n_docs=4)
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"config": str(ROOT / "configs" / "models" / "tiny.yaml")},
        "tokenizer": {"train_bpe": 300},
        "data": {"source": [str(f) for f in files[:-1]], "validation": [str(files[-1])], "seq_len": 16},
        "train": {"steps": 3, "batch_size": 2, "eval_every": 0, "eval_batches": 1, "log_every": 1,
                  "warmup_steps": 1},
        "out": str(tmp_path / "unused"),
    }))
    command = [sys.executable, str(ROOT / "scripts" / "compare_kv_sharing.py"), "--config", str(config),
               "--maps", "standard,cla:2,lckv:2", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "res"),
               "--fixed-point-batches", "1"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    table = (tmp_path / "res" / "kv_sharing.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "KV sharing" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["standard", "cla:2", "lckv:2"]
    assert "8 / 8" in rows[0] and "4 / 8" in rows[1] and "3 / 8" in rows[2]  # KV layers follow the maps
    assert "0.50x" in rows[1] and "0.38x" in rows[2]  # KV bytes/token against the standard model
    assert "n/a" in rows[0] and "n/a" not in rows[2]  # only LCKV has a fixed point to report
    assert (tmp_path / "res" / "kv_sharing_val_loss.png").stat().st_size > 10_000
    again = subprocess.run(command, check=True, capture_output=True, text=True)  # finished runs are reused
    assert "resuming" in again.stderr
