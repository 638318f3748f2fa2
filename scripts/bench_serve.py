"""Serving benchmark: jaxkv's OpenAI server under concurrent clients against HF transformers' static batching.

    .venv/bin/python scripts/bench_serve.py [--requests 64] [--concurrency 1,8,32,64] [--hf-batch 16]
        [--kv-budget-mib 48] [--out docs/results/serve.md] [--plot docs/results/serve.png]

1. The workload: `--requests` prompts cut from the held-out Shakespeare plays (lengths drawn in
   [--min-prompt, --max-prompt] tokens) with max_tokens drawn in [--min-new, --max-new]; greedy,
   EOS ignored, so both sides produce exactly the same number of tokens.
2. jaxkv: the real HTTP server on 127.0.0.1 (warmed up first), driven by asyncio clients streaming
   /v1/completions at each concurrency level. Every level runs cold: a fresh engine (the warm-up's
   executables, an empty pool and prefix cache), so no level finds an earlier level's prompts cached.
   Reports tokens/s, time to first token and inter-token latency (p50/p99), prompt tokens served from
   the prefix cache, KV pages in use (peak), mean rows and tokens per step, compilations after warm-up.
3. The peer, in the same run on the same requests: transformers' `generate` with static batching
   (batches in arrival order, left-padded, each batch runs to its longest request), at each of
   --hf-batch sizes; the best is the reference.
4. A second workload where every request starts with one shared system prompt of --system-tokens
   tokens, at the highest concurrency, cold: here the prefix cache counts, legitimately; HF recomputes.
5. At a fixed KV memory budget: the standard SmolLM2 geometry against its LCKV (w=2) and CLA2
   variants (K/V projections averaged, as for uptraining), every request submitted at once to an
   engine with many slots: the peak number of sequences held at once, and tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def workload(llm, n: int, seed: int, prompt_range, new_range, system: str = "") -> list[dict]:
    """Requests with prompt text (as the server will tokenize it; after `system` if given), its ids, and
    max_tokens."""
    from jaxkv.data.corpus import load_split

    text = "\n".join(d.text for d in load_split("shakespeare").validation)
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(n):
        length = int(rng.integers(prompt_range[0], prompt_range[1] + 1))
        start = int(rng.integers(0, len(ids) - length))
        prompt = system + llm.tokenizer.decode(ids[start:start + length])
        requests.append({"prompt": prompt, "ids": llm.encode(prompt),
                         "max_tokens": int(rng.integers(new_range[0], new_range[1] + 1))})
    return requests


def percentile(values, q) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# --- jaxkv over HTTP -----------------------------------------------------------------------------
def start_server(app) -> tuple[int, object, threading.Thread]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return port, server, thread


def metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def system_prompt(llm, n_tokens: int) -> str:
    """The opening lines of the training plays, cut to about n_tokens tokens (a long shared instruction)."""
    from jaxkv.data.corpus import load_split

    ids = llm.tokenizer.encode("\n".join(d.text for d in load_split("shakespeare").train), add_special_tokens=False)
    return llm.tokenizer.decode(ids[:n_tokens]) + "\n\n"


async def run_level(port: int, requests: list[dict], concurrency: int) -> dict:
    """Every request, `concurrency` at a time, each streamed; per-request first-token and chunk times."""
    import httpx

    url = f"http://127.0.0.1:{port}"
    gate = asyncio.Semaphore(concurrency)
    ttft, gaps, tokens, peak_pages = [], [], [0], [0.0]

    async def one(client, req):
        async with gate:
            body = {"prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            start = last = time.perf_counter()
            async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens[0] += chunk["usage"]["completion_tokens"]
                    if not chunk["choices"]:
                        continue
                    now = time.perf_counter()
                    if last == start:
                        ttft.append(now - start)
                    else:
                        gaps.append(now - last)
                    last = now

    async def watch(client, done):
        while not done.is_set():
            text = (await client.get(f"{url}/metrics")).text
            used, free = metric(text, "jaxkv_kv_pages_used"), metric(text, "jaxkv_kv_pages_free")
            peak_pages[0] = max(peak_pages[0], used / (used + free))
            await asyncio.sleep(0.25)

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=concurrency + 2)) as client:
        done = asyncio.Event()
        watcher = asyncio.create_task(watch(client, done))
        start = time.perf_counter()
        await asyncio.gather(*(one(client, r) for r in requests))
        wall = time.perf_counter() - start
        done.set()
        await watcher
        text = (await client.get(f"{url}/metrics")).text
    return {"concurrency": concurrency, "tokens": tokens[0], "wall": wall, "tok_s": tokens[0] / wall,
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99), "itl_p50": percentile(gaps, 50),
            "itl_p99": percentile(gaps, 99), "kv_peak": peak_pages[0],
            "compilations": metric(text, "jaxkv_compilations_total"),
            "cached": metric(text, "jaxkv_prefix_cache_tokens_total"),
            "prompt": metric(text, "jaxkv_prompt_tokens_total"),
            "rows": metric(text, "jaxkv_engine_rows_per_step"),
            "step_tokens": metric(text, "jaxkv_engine_tokens_per_step")}


def serve_cold(llm, warm, requests: list[dict], concurrency: int) -> dict:
    """One level on a fresh engine sharing the warmed-up engine's executables: nothing cached from before."""
    from jaxkv.serve.engine import Engine
    from jaxkv.serve.server import create_app

    engine = Engine(llm, max_batch=warm.max_batch, page_size=warm.page_size, max_context=warm.max_context,
                    prefill_chunk=warm.prefill_chunk, prefill_budget=warm.prefill_budget,
                    executables=warm.executables)
    port, server, thread = start_server(create_app(llm, engine=engine, warmup=False))
    try:
        return asyncio.run(run_level(port, requests, concurrency))
    finally:
        server.should_exit = True
        thread.join()


# --- the peer ------------------------------------------------------------------------------------
def _hf_model():
    import torch
    from transformers import AutoModelForCausalLM

    from bench_decode import export_dense_hf

    return AutoModelForCausalLM.from_pretrained(export_dense_hf(), dtype=torch.float32).eval()


def hf_static(model, requests: list[dict], batch: int, pad_id: int) -> dict:
    import torch

    start = time.perf_counter()
    produced = 0
    for first in range(0, len(requests), batch):
        group = requests[first:first + batch]
        width = max(len(r["ids"]) for r in group)
        ids = torch.tensor([[pad_id] * (width - len(r["ids"])) + r["ids"] for r in group])
        mask = torch.tensor([[0] * (width - len(r["ids"])) + [1] * len(r["ids"]) for r in group])
        new = max(r["max_tokens"] for r in group)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                                 pad_token_id=pad_id)
        assert out.shape[1] == width + new
        produced += sum(r["max_tokens"] for r in group)  # the tokens each request asked for
    wall = time.perf_counter() - start
    return {"tokens": produced, "wall": wall, "tok_s": produced / wall}


def level_row(name: str, r: dict, warm_compilations: int) -> str:
    """One level as a table row (printed as it finishes, so a stopped run keeps what it measured)."""
    return (f"| {name} | {r['concurrency']} | {r['tok_s']:.1f} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} "
            f"| {1e3 * r['itl_p50']:.0f} / {1e3 * r['itl_p99']:.0f} | {int(r['cached'])} of {int(r['prompt'])} | "
            f"{100 * r['kv_peak']:.0f}% | {r['rows']:.1f} / {r['step_tokens']:.1f} | "
            f"{int(r['compilations']) - warm_compilations} |")


# --- a fixed KV budget ---------------------------------------------------------------------------
def at_budget(llm, spec: str, requests: list[dict], budget_bytes: int, max_batch: int, max_context: int,
              prefill_chunk: int, prefill_budget: int) -> dict:
    from jaxkv.api import LLM
    from jaxkv.cache.dense import kv_bytes_per_token
    from jaxkv.model.uptrain import share_kv
    from jaxkv.serve.engine import Engine, Request
    from jaxkv.sharing import parse_spec

    layer_map = parse_spec(spec, llm.config.n_layers)
    cfg, params = share_kv(llm.config, llm.params, layer_map.sources, layer_map.windowed)
    page_size = 16
    pages = budget_bytes // (kv_bytes_per_token(cfg) * page_size)
    engine = Engine(LLM(cfg, llm.tokenizer, params), max_batch=max_batch, page_size=page_size, num_pages=pages,
                    max_context=max_context, prefill_chunk=prefill_chunk, prefill_budget=prefill_budget,
                    prefix_caching=False)
    for r in requests:  # no warm-up: the shapes this run needs compile on first use, and their time is left out
        engine.add(Request(r["ids"], max_tokens=r["max_tokens"], ignore_eos=True))
    peak, produced, start = 0, 0, time.perf_counter()
    while engine.has_work():
        produced += sum(len(o.token_ids) for o in engine.step())
        peak = max(peak, engine.metrics()["running"])
    wall = time.perf_counter() - start - engine.executables.compile_s
    return {"spec": spec, "chunk": prefill_chunk, "kv_layers": cfg.n_kv_layers,
            "bytes_per_token": kv_bytes_per_token(cfg), "pages": pages, "peak_running": peak, "tok_s": produced / wall,
            "preemptions": engine.metrics()["preemptions_total"], "compiled": engine.executables.count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--min-new", type=int, default=16)
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=32, help="engine decode slots")
    parser.add_argument("--max-context", type=int, default=512)
    parser.add_argument("--prefill-chunk", type=int, default=128, help="longest prefill call (engine)")
    parser.add_argument("--prefill-budget", type=int, default=None, help="prompt tokens per step (default 4 chunks)")
    parser.add_argument("--hf-batch", default="8,16,32", help="static batch sizes tried for HF (its best is the peer)")
    parser.add_argument("--kv-budget-mib", type=float, default=48.0)
    parser.add_argument("--budget-requests", type=int, default=80)
    parser.add_argument("--budget-slots", type=int, default=80)
    parser.add_argument("--lckv-chunks", default="4,8", help="prompt chunk sizes tried for LCKV at the budget: a chunk "
                                                            "of c tokens runs min(c, m + b) passes")
    parser.add_argument("--system-tokens", type=int, default=200, help="shared system prompt of the second workload")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "serve.md"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "results" / "serve.png"))
    args = parser.parse_args()

    import jaxkv
    from jaxkv.serve.engine import Engine

    llm = jaxkv.load(args.model, dtype="float32")
    drawn = workload(llm, max(args.requests, args.budget_requests), args.seed, (args.min_prompt, args.max_prompt),
                     (args.min_new, args.max_new))
    requests = drawn[:args.requests]
    system = system_prompt(llm, args.system_tokens)
    shared = workload(llm, args.requests, args.seed + 1, (args.min_prompt, max(args.min_prompt, args.max_prompt
                                                                                 - args.system_tokens)),
                      (args.min_new, args.max_new), system)
    engine = Engine(llm, max_batch=args.max_batch, max_context=args.max_context, prefill_chunk=args.prefill_chunk,
                    prefill_budget=args.prefill_budget)
    engine.warmup()
    warm_compilations, warm_s = engine.executables.count, engine.executables.compile_s
    levels = []
    print(f"warm-up: {warm_compilations} executables in {warm_s:.0f} s", flush=True)
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        levels.append(serve_cold(llm, engine, requests, concurrency))
        print(level_row("distinct prompts", levels[-1], warm_compilations), flush=True)
    top = max(int(c) for c in args.concurrency.split(","))
    shared_run = serve_cold(llm, engine, shared, top)
    print(level_row("shared system prompt", shared_run, warm_compilations), flush=True)
    hf_runs, hf_shared, hf_model = {}, {}, _hf_model()
    for batch in (int(b) for b in args.hf_batch.split(",")):
        hf_runs[batch] = hf_static(hf_model, requests, batch, llm.tokenizer.eos_ids[0])
        hf_shared[batch] = hf_static(hf_model, shared, batch, llm.tokenizer.eos_ids[0])
        print(f"HF static batching ({batch}): {hf_runs[batch]['tok_s']:.1f} tok/s, shared system prompt "
              f"{hf_shared[batch]['tok_s']:.1f} tok/s", flush=True)
    hf_batch, hf = max(hf_runs.items(), key=lambda item: item[1]["tok_s"])
    hf_shared_batch, hf_shared_best = max(hf_shared.items(), key=lambda item: item[1]["tok_s"])
    runs = [("standard", args.prefill_chunk)] + [("lckv:2", int(c)) for c in args.lckv_chunks.split(",")] + \
        [("cla2", args.prefill_chunk)]
    budget = []
    for spec, chunk in runs if args.budget_requests else []:  # 0: skip this part
        budget.append(at_budget(llm, spec, drawn[:args.budget_requests], int(args.kv_budget_mib * 2**20),
                                args.budget_slots, args.max_context, chunk, engine.prefill_budget))
        print(f"at the KV budget: {budget[-1]}", flush=True)

    best = max(levels, key=lambda r: r["tok_s"])
    lines = [f"# Serving {args.model}: jaxkv's server against HF transformers", "",
             f"Command: `python scripts/bench_serve.py {shlex.join(sys.argv[1:])}` on a "
             f"{__import__('os').cpu_count()}-core CPU, float32. {args.requests} requests: prompts of "
             f"{args.min_prompt}-{args.max_prompt} tokens of held-out Shakespeare, {args.min_new}-{args.max_new} "
             f"new tokens each, greedy, EOS ignored; {sum(r['max_tokens'] for r in requests)} tokens in all. "
             f"Engine: {args.max_batch} rows, pages of 16, max context {args.max_context}, prompt chunks of "
             f"up to {args.prefill_chunk}, {engine.prefill_budget} prompt tokens per step, one device call per "
             f"step; warm-up compiled {warm_compilations} executables in {warm_s:.0f} s. Every level runs cold "
             "(a fresh engine: empty pool and prefix cache).",
             "", "| workload | clients | tok/s | TTFT p50 / p99 (s) | inter-token p50 / p99 (ms) | prompt tokens "
             "from the prefix cache | peak KV pages used | mean rows / tokens per step | compilations after "
             "warm-up |", "|---|---:|---:|---|---|---:|---:|---|---:|"]
    lines += [level_row(name, r, warm_compilations) for name, r in [("distinct prompts", r) for r in levels] +
              [(f"{args.system_tokens}-token system prompt", shared_run)]]
    lines += ["", "HF transformers `generate` with static batches (arrival order, left-padded, each batch runs "
              "to its longest request): " + ", ".join(f"{b}: {r['tok_s']:.1f} tok/s" for b, r in hf_runs.items())
              + "; on the shared-system-prompt workload " + ", ".join(f"{b}: {r['tok_s']:.1f} tok/s" for b, r
                                                                       in hf_shared.items())
              + f". jaxkv at its best level ({best['concurrency']} clients, cold) against HF's best (batch "
              f"{hf_batch}): **{best['tok_s'] / hf['tok_s']:.2f}x**; with the shared system prompt against HF's best "
              f"(batch {hf_shared_batch}): **{shared_run['tok_s'] / hf_shared_best['tok_s']:.2f}x**."]
    if budget:
        lines += ["", f"At a fixed KV budget of {args.kv_budget_mib:g} MiB ({args.budget_requests} requests submitted "
                  f"at once, {args.budget_slots} slots):", "",
                  "| KV sharing | prompt chunk | KV layers | KV bytes/token | pages | peak sequences held | "
                  "vs standard | target | tok/s (compiling left out) | preemptions | executables compiled |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in budget:
        target = 0.9 * llm.config.n_layers / r["kv_layers"] if r is not budget[0] else 1.0
        lines.append(f"| {r['spec']} | {r['chunk']} | {r['kv_layers']} | {r['bytes_per_token']:,} | {r['pages']} | "
                     f"{r['peak_running']} | {r['peak_running'] / budget[0]['peak_running']:.2f}x | {target:.2f}x | "
                     f"{r['tok_s']:.1f} | {r['preemptions']} | {r['compiled']} |")
    report = "\n".join(lines) + "\n"
    Path(args.out).write_text(report)
    print(report)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["concurrency"] for r in levels], [r["tok_s"] for r in levels], "o-", label="jaxkv server")
    ax.axhline(hf["tok_s"], color="gray", ls="--", label=f"HF static batching ({hf_batch}, its best)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("generated tokens/s")
    ax.set_title(f"{args.model}, {args.requests} requests, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
