"""scripts/bench_attention.py on a tiny CPU config, kernels interpreted: one row per (context, backend),
small errors against the reference, the command recorded; a mismatch exits non-zero."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_attention.py"
TINY = ["--batch", "2", "--q-heads", "4", "--kv-heads", "2", "--head-dim", "64", "--page-size", "16",
        "--dtype", "float32", "--interpret"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(markdown: str) -> list[dict]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]


def test_tiny_interpreted_run_writes_the_table(bench, tmp_path, capsys):
    out = tmp_path / "x.md"
    argv = ["--contexts", "64,128", *TINY, "--repeats", "3", "--backends", "reference,gpu,tpu,upstream-gpu",
            "--out", str(out)]
    assert bench.main(argv) == 0
    text = out.read_text()
    assert "python scripts/bench_attention.py " + " ".join(argv) in text
    assert "jax " in text and "Device: cpu" in text
    rows = table_rows(text)
    assert [(r["context"], r["backend"]) for r in rows] == [
        (c, b) for c in ("64", "128") for b in ("reference", "gpu", "tpu", "upstream-gpu")]
    for row in rows:
        assert float(row["rel. error"]) < 1e-5, row
        assert float(row["median us"]) > 0 and float(row["GB/s"]) > 0, row
        assert row["% of peak"] == "", row  # CPU: no known HBM peak
        if row["backend"] != "reference":
            assert "interpret: timing meaningless" in row["note"] and row["/ reference"], row
    assert all(r["/ upstream"] for r in rows if r["backend"] == "gpu")
    assert "| upstream-gpu" in capsys.readouterr().out  # the table goes to stdout too


def test_upstream_without_window_support_is_a_row_not_a_crash(bench, tmp_path):
    out = tmp_path / "w.md"
    assert bench.main(["--contexts", "64", *TINY, "--repeats", "1", "--sinks", "4", "--window", "20",
                       "--backends", "gpu,upstream-gpu", "--out", str(out)]) == 0
    rows = {r["backend"]: r for r in table_rows(out.read_text())}
    assert rows["upstream-gpu"]["note"] == "n/a (upstream has no sinks/window)"
    assert float(rows["gpu"]["rel. error"]) < 1e-5


def test_a_mismatch_fails_loudly(bench, monkeypatch, capsys):
    monkeypatch.setitem(bench.TOLERANCE, "float32", 0.0)  # any rounding difference is now a mismatch
    assert bench.main(["--contexts", "64", *TINY, "--repeats", "1", "--backends", "gpu"]) == 1
    captured = capsys.readouterr()
    assert "MISMATCH" in captured.out and "FAILED" in captured.err
