"""Run notebooks/quickstart.ipynb at its full defaults in a Jupyter kernel, as a user would, and write what each
section took and printed to a Markdown file (docs/results/quickstart.md): how long the tour takes on this machine,
and its measured tables (compressed KV, speculative decoding, training).

    python scripts/run_notebook.py [--out docs/results/quickstart.md] [--executed /tmp/quickstart.ipynb]
                                   [--set NAME=VALUE ...]

--set replaces a parameter (a Python literal), e.g. --set "HUB_MODEL='/tmp/smollm2-hf'" where no Hub is reachable
(an HF folder, such as `jaxkv convert --model smollm2-135m --to-hf /tmp/smollm2-hf` writes).

The run happens in a temporary folder (the server's log, the training runs); the server listens on the notebook's
SERVE_PORT. Set-up first: bash scripts/setup.sh test (nbclient and ipykernel come with the test extra).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _seconds(cell) -> float:
    timing = cell.metadata.get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not (start and end):
        return 0.0
    parse = datetime.datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


def _printed(cell) -> str:
    text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream"
                   and o.get("name") == "stdout")
    return ANSI.sub("", text).strip()


def parameters_cell(nb) -> int:
    """The index of the notebook's one cell tagged `parameters`."""
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"the notebook needs exactly one cell tagged 'parameters', found {len(tagged)}")
    return tagged[0]


def execute(nb, assignments: list[str], folder: Path, timeout: int) -> None:
    """Run `nb` cell by cell in a Jupyter kernel working in `folder`: `assignments` ("NAME = VALUE" lines) go in a
    cell after the parameters, as papermill injects them, and this interpreter's scripts come first on the kernel's
    PATH (its `!jaxkv` lines). A failing cell raises nbclient's CellExecutionError; `nb` keeps every output."""
    if assignments:
        nb.cells.insert(parameters_cell(nb) + 1, nbformat.v4.new_code_cell(
            "\n".join(assignments), metadata={"tags": ["injected-parameters"]}))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(folder)}}).execute(env=env)


def sections(nb) -> list[tuple[str, float, list[str]]]:
    """(heading, seconds, what its cells printed) per `##` section of an executed notebook."""
    out = [("(before the first section)", 0.0, [])]
    for cell in nb.cells:
        if cell.cell_type == "markdown" and (m := re.search(r"^##+ (.+)$", cell.source, re.M)):
            out.append((m.group(1), 0.0, []))
        elif cell.cell_type == "code":
            heading, seconds, printed = out[-1]
            out[-1] = (heading, seconds + _seconds(cell), printed + ([text] if (text := _printed(cell)) else []))
    return [s for s in out if s[1] or s[2]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "quickstart.md"))
    parser.add_argument("--executed", default=None, help="also write the executed notebook here")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="replace a parameter")
    args = parser.parse_args()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jaxkv-notebook-") as run:
        try:
            execute(nb, args.set, Path(run), timeout=3600)
        finally:
            if args.executed:
                nbformat.write(nb, args.executed)
    total = time.perf_counter() - start
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    lines = [f"# The quick-start notebook at its defaults ({platform.machine()}, {_devices()})", "",
             f"Command: `python scripts/run_notebook.py{''.join(' ' + shlex.quote(a) for a in sys.argv[1:])}`. Run "
             f"{time.strftime('%Y-%m-%d')} at commit {commit}: {total / 60:.1f} minutes in all, the kernel's start "
             "and the model's first load included.", "",
             "| section | seconds |", "|---|---:|"]
    found = sections(nb)
    lines += [f"| {heading} | {seconds:.0f} |" for heading, seconds, _ in found]
    for heading, _, printed in found:
        if printed:
            lines += ["", f"## {heading}", "", "```", *"\n\n".join(printed).splitlines(), "```"]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} ({total / 60:.1f} min)", file=sys.stderr)


def _devices() -> str:
    import jax

    return f"{jax.default_backend()}: {', '.join(sorted({d.device_kind for d in jax.devices()}))}"


if __name__ == "__main__":
    main()
