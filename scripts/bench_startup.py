"""Start-up cost: a command's first run against its second, with the compilation cache on, and with it off.

    python scripts/bench_startup.py [--model smollm2-135m] [--repeats 1] [--out docs/results/startup.md]

What a user waits for, end to end, from the shell:
- generate: `jaxkv generate --prompt ... --max-new-tokens 8`, process start to exit;
- serve: `jaxkv serve` (defaults: max_batch 8, warm-up of every step shape) from process start until /health
  answers, then stopped.
Each runs three ways: cold (an empty cache directory: compile and keep), warm (the same command again: load what
the cold run kept) and off (--no-compilation-cache: what every run cost before). Cold and warm share a fresh cache
directory (JAX_COMPILATION_CACHE_DIR) and the model is converted before anything is timed. The table gives medians
over --repeats and the warm run's ratio to the off run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JAXKV = str(Path(sys.executable).parent / "jaxkv")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate(model: str, env: dict, extra: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([JAXKV, "generate", "--model", model, "--prompt", "The capital of France is", "--max-new-tokens",
                    "8", *extra], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def serve(model: str, env: dict, extra: list[str], timeout: float = 1800) -> float:
    port = free_port()
    start = time.perf_counter()
    server = subprocess.Popen([JAXKV, "serve", "--model", model, "--port", str(port), *extra], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < timeout:
            if server.poll() is not None:
                raise SystemExit(f"jaxkv serve exited with {server.returncode} before it answered")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.5)
        raise SystemExit(f"jaxkv serve did not answer within {timeout:.0f} s")
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--commands", default="generate,serve")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "startup.md"))
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "JAXKV_COMPILATION_CACHE")}
    generate(args.model, {**base, "JAXKV_COMPILATION_CACHE": "0"}, [])  # the model converted, outside the timing
    runs = {"generate": generate, "serve": serve}
    results = {}
    for command in args.commands.split(","):
        times = {"cold": [], "warm": [], "off": []}
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cache:
                env = {**base, "JAX_COMPILATION_CACHE_DIR": cache}
                times["cold"].append(runs[command](args.model, env, []))
                times["warm"].append(runs[command](args.model, env, []))
                entries = sum(1 for _ in Path(cache).rglob("*") if _.is_file())
            times["off"].append(runs[command](args.model, base, ["--no-compilation-cache"]))
        results[command] = {way: statistics.median(t) for way, t in times.items()} | {"cache_files": entries}
        print(command, json.dumps(results[command]), flush=True)
    lines = ["# Start-up: first and second run", "",
             f"`{shlex.join(['python', 'scripts/bench_startup.py', *sys.argv[1:]])}` on {args.model} (CPU); seconds "
             f"from process start, median of {args.repeats}. cold: empty cache (compiles and keeps); warm: the same "
             "command again; off: `--no-compilation-cache` (every run before the cache).", "",
             "| command | cold s | warm s | off s | warm / off | files kept |", "|---|---|---|---|---|---|"]
    for command, r in results.items():
        lines.append(f"| {command} | {r['cold']:.1f} | {r['warm']:.1f} | {r['off']:.1f} | {r['warm'] / r['off']:.2f}"
                     f" | {r['cache_files']} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
