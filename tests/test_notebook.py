"""notebooks/quickstart.ipynb, executed as a user runs it (a Jupyter kernel, cell by cell, `!jaxkv` shell lines), on
CPU with its parameter cell's values shrunk: every cell must run without error, its figures must be drawn, and what
it claims must be what it printed (speculative decoding gives the plain tokens). Its Hub cell downloads from the fake
Hub of tests/fake_hub.py through HF_ENDPOINT; its server is a real `jaxkv serve` on 127.0.0.1.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import socket
import threading
import tomllib
from pathlib import Path

import psutil
import pytest

from conftest import write_tiny_hf_llama
from fake_hub import FakeHub

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
_spec = importlib.util.spec_from_file_location("run_notebook", ROOT / "scripts" / "run_notebook.py")
run_notebook = importlib.util.module_from_spec(_spec)  # the runner scripts/run_notebook.py uses at full size
_spec.loader.exec_module(run_notebook)
HUB_REPO = "tiny-org/tiny-llama"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_parameters(port: int) -> dict:
    """What CI runs instead of the notebook's defaults: a few minutes on a 2-core CPU."""
    return dict(MODEL="smollm2-135m", HUB_MODEL=HUB_REPO, MAX_NEW_TOKENS=12,
                SERVE_ARGS=["--max-batch", "2", "--max-context", "128", "--prefill-chunk", "16"], SERVE_PORT=port,
                CLIENTS=2, KV_DTYPES=["int8"], STREAMING_WINDOW=32, PPL_CONTEXT=96, PPL_WINDOWS=1,
                SPECULATIVE="ngram:4", SPEC_TOKENS=40, TRAIN_STEPS=6, TRAIN_BATCH=4)


def _stop_servers(port: int) -> None:
    """Kill any `jaxkv serve ... --port PORT` still running."""
    for process in psutil.process_iter(["cmdline"]):
        args = process.info["cmdline"] or []
        if "serve" in args and any(a == "--port" and b == str(port) for a, b in zip(args, args[1:])):
            process.kill()


def _notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def _assigned(source: str) -> set[str]:
    return {target.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def _text(cell) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def _images(cell) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def test_notebook_is_committed_clean_and_points_where_the_readme_does():
    """No outputs in git (CI makes them); the badge, the install cell and the README name pyproject's repository."""
    nb = _notebook()
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"), \
        "notebooks/quickstart.ipynb holds outputs: clear them before committing"
    repo = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    badge = f"https://colab.research.google.com/github/{repo.removeprefix('https://github.com/')}/blob/main/" \
            "notebooks/quickstart.ipynb"
    assert badge in (ROOT / "README.md").read_text(), "the README's Open in Colab badge does not link the notebook"
    assert badge in nb.cells[0].source
    assert f'JAXKV_SOURCE = "git+{repo}"' in "".join(c.source for c in nb.cells)


def test_parameters_cover_every_value_ci_shrinks():
    """CI's values replace names the parameter cell assigns, all of them: a renamed parameter fails here, not by
    silently running the full-size work in CI."""
    nb = _notebook()
    assert _assigned(nb.cells[run_notebook.parameters_cell(nb)].source) == set(small_parameters(0))


@pytest.fixture
def fake_hub(tmp_path):
    write_tiny_hf_llama(tmp_path / "repo", tie=False)
    server = FakeHub({HUB_REPO: {"main": ("7" * 40, tmp_path / "repo")}}, {})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.mark.slow
def test_quickstart_notebook_runs_on_cpu(tmp_path, fake_hub, monkeypatch, smollm2_checkpoint):
    port = _free_port()
    nb = _notebook()
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    run = tmp_path / "run"
    run.mkdir()
    try:
        run_notebook.execute(nb, [f"{name} = {value!r}" for name, value in small_parameters(port).items()], run,
                             timeout=1200)
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"a notebook cell failed:\n{str(e)[-4000:]}")
    finally:
        _stop_servers(port)  # one a failed cell left running
        nbformat.write(nb, run / "quickstart.executed.ipynb")  # to read what each cell printed
    cells = {i: c for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    out = "\n".join(_text(c) for c in cells.values())

    assert "not on Colab" in out, "the install cell installed something outside Colab"
    assert re.search(r"attention_kernels\s+reference", out), "`!jaxkv env` printed no kernel line"
    assert "KV 46,080 bytes per token" in out  # SmolLM2: 30 layers x 3 KV heads x 64 x 2 (K and V) x 4 (float32)
    drawn = {i: _images(c) for i, c in cells.items() if _images(c)}
    assert len(drawn) == 2, f"the plan figure and the loss plot should each draw one image, drawn: {drawn}"
    assert "the same tokens as plain decoding: True" in out
    assert re.search(r"2 requests at once: \d+ tokens", out)
    assert re.search(r"compilations at start-up, 0 while serving", out), "the warmed-up server compiled again"
    assert (run / "runs" / "quickstart-cla2" / "final").is_dir()
    assert (fake_hub.seen and any(HUB_REPO in path for _, path in fake_hub.seen)), "the Hub cell never asked the Hub"
