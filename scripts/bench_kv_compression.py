"""What each KV compression costs in quality and saves in memory: SmolLM2 over held-out Shakespeare.

    python scripts/bench_kv_compression.py [--contexts 2048,4096] [--windows 2] [--score 256] \\
        [--needle 1024,2048,4096] [--configs float32,bfloat16,fp8,fp8-rot,int8,int8-rot,int4,int4-rot,\\
        kivi4,kivi4-rot,kivi2,kivi2-rot,h2o-10%,h2o-20%,h2o-50%,snapkv-10%,snapkv-20%,snapkv-50%,DTYPE+EVICTION] \\
        [--out docs/results/kv_compression.md] [--keep]

Every configuration runs through the serving runtime (`jaxkv.eval.perplexity`): each window of `context` tokens is
one request whose first context - score tokens are prefilled in chunks and whose last `score` tokens are fed one per
step, as decoding feeds sampled ones, so each compression acts where serving pays for it: on a long context. The
reference is float32 KV with nothing dropped, run in lockstep on the same requests: top-1 agreement and mean
KL(reference || config) per scored token. Bytes are the pages each request held at its end (scales included);
"sequences in 1 GiB" is how many such requests a GiB of KV holds. Eviction (H2O, SnapKV) runs on float32 KV with
a budget of 10/20/50% of the context: the prompt is cut to it once prefilled, then H2O keeps it while the scored
tokens come (SnapKV keeps them all).

The needle test states a random 5-digit number early in a long held-out text (at 10% depth) and asks for it at the
end, greedy; a trial passes if the number comes back.

Writes a markdown table and a PNG of quality against KV bytes (the Pareto front), with the papers' claims beside it,
and the results as JSON beside them; --keep first reads that JSON back and keeps the results this run does not redo
(a long run done in parts, or one configuration added).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

import jaxkv
from jaxkv.api import LLM
from jaxkv.cache.dense import kv_bytes_per_token
from jaxkv.cache.eviction import eviction_policy
from jaxkv.data.corpus import shakespeare_split
from jaxkv.eval import perplexity, record
from jaxkv.generate.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
# name -> (KV dtype of the pages, keys and queries rotated by a Hadamard matrix before the KV is stored)
CONFIGS = {"float32": ("float32", False), "bfloat16": ("bfloat16", False), "fp8": ("fp8", False),
           "fp8-rot": ("fp8", True), "int8": ("int8", False), "int8-rot": ("int8", True), "int4": ("int4", False),
           "int4-rot": ("int4", True), "kivi4": ("kivi4", False), "kivi4-rot": ("kivi4", True),
           "kivi2": ("kivi2", False), "kivi2-rot": ("kivi2", True)}
# name -> (eviction method, KV budget as a fraction of the context); float32 KV
EVICTIONS = {f"{method}-{percent}%": (method, percent / 100)
             for method in ("h2o", "snapkv") for percent in (10, 20, 50)}
# What the papers and peers report (../shared/reference/methods.md), shown beside the measured points.
CLAIMS = [
    "int8 per (token, head) absmax (xFasterTransformer): 0.52x fp16 bytes",
    "fp8 e4m3: the peers' default KV compression (vLLM, SGLang, TRT-LLM)",
    "int4 per (token, 32 channels) (TRT-LLM, LMDeploy): about 0.3x fp16 bytes, small loss",
    "KIVI-2: keys per channel, values per token, 2 bits, <= 0.2x bf16, small loss",
    "H2O: 20% of the KV kept, small quality loss (up to 29x throughput)",
    "SnapKV: prompt cut once by its last 32 queries, negligible LongBench loss at 16K",
    "StreamingLLM: 4 sinks + window, stable perplexity (Llama-2-7B 9.59 with 4 sinks)",
]


def model_for(base: LLM, name: str, context: int, kv_recent: int = 128) -> LLM:
    """The configuration `name` of the base model: a KV dtype (CONFIGS), an eviction on float32 KV (EVICTIONS), or
    both joined by "+" (kivi4+h2o-20%); an eviction budget is a fraction of `context`; KIVI keeps the last kv_recent
    tokens in float."""
    dtype_name, _, eviction_name = name.rpartition("+") if "+" in name or name in EVICTIONS else (name, "", "")
    kv_dtype, rotate = CONFIGS[dtype_name or "float32"]
    policy = None
    if eviction_name:
        method, fraction = EVICTIONS[eviction_name]
        policy = eviction_policy(method, int(fraction * context))
    return LLM(base.config.replace(kv_rotate=rotate), base.tokenizer, base.params, kv_dtype=kv_dtype,
               kv_recent=kv_recent, eviction=policy)


def known(name: str) -> bool:
    dtype_name, _, eviction_name = name.rpartition("+")
    return name in CONFIGS or name in EVICTIONS or (dtype_name in CONFIGS and eviction_name in EVICTIONS)


def needle_trials(llm: LLM, filler: list[int], context: int, trials: int, seed: int) -> int:
    """Greedy answers to "what is the secret number" after `context` tokens with the number at 10% depth."""
    rng = np.random.default_rng(seed)
    tok = llm.tokenizer
    passed = 0
    for t in range(trials):
        number = str(int(rng.integers(10000, 100000)))
        needle = tok.encode(f"\nRemember this: the secret number is {number}.\n", add_special_tokens=False)
        question = tok.encode("\nQuestion: what is the secret number? Answer: the secret number is",
                              add_special_tokens=False)
        body = context - len(needle) - len(question) - 1
        start = int(rng.integers(0, len(filler) - body))
        text = filler[start:start + body]
        depth = body // 10
        prompt = [*tok.encode("", add_special_tokens=True), *text[:depth], *needle, *text[depth:], *question]
        out = llm.generate_ids([prompt], 8, SamplingParams(), ignore_eos=True)[0]
        passed += number in tok.decode(out.token_ids)
    return passed


def plot(rows: list[dict], bf16_per_token: int, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    for context in sorted({r["context"] for r in rows}):
        pts = sorted(((r["kv_bytes_held"] / r["context"] / bf16_per_token, r["mean_kl"], r["config"])
                      for r in rows if r["context"] == context), key=lambda p: p[0])
        ax.scatter([p[0] for p in pts], [max(p[1], 1e-7) for p in pts], label=f"{context} tokens")
        for x, y, name in pts:
            ax.annotate(name, (x, max(y, 1e-7)), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front, best = [], float("inf")
        for x, y, _ in pts:  # cheapest first: a point is on the front if nothing cheaper is better
            if y < best:
                front.append((x, max(y, 1e-7)))
                best = y
        ax.plot(*zip(*front), linestyle="--", alpha=0.5)
    ax.set_xlabel("KV bytes per token held, relative to bf16")
    ax.set_ylabel("mean KL(float32 KV || config), nats per token")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M, held-out Shakespeare: quality against KV memory")
    ax.legend()
    axes[1].axis("off")
    axes[1].text(0, 1, "Reported elsewhere:\n\n" + "\n\n".join(f"- {c}" for c in CLAIMS), va="top", wrap=True,
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def write_outputs(args, base, names, rows: list[dict], needles: list[dict], bf16: int) -> Path:
    """The table, the PNG and the JSON of what has been measured so far (rewritten after every result)."""
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "needles": needles}, indent=1) + "\n")
    names = list(dict.fromkeys([*CONFIGS, *EVICTIONS, *names, *(r["config"] for r in rows),
                                *(n["config"] for n in needles)]))
    rows = sorted(rows, key=lambda r: (r["context"], names.index(r["config"])))
    lines = [f"# KV compression on {base.config.name}: quality against memory", "",
             f"Command: `python scripts/bench_kv_compression.py --contexts {args.contexts} --windows {args.windows} "
             f"--score {args.score} --needle {shlex.quote(args.needle)} --needle-trials {args.needle_trials} "
             f"--configs {args.configs}{f' --needle-configs {args.needle_configs}' * bool(args.needle_configs)}"
             f"{' --keep' * args.keep}"
             f"{f' --model {args.model}' * (args.model != 'smollm2-135m')}"
             f"{f' --kv-recent {args.kv_recent}' * (args.kv_recent != 128)}`"
             + (" (the rows of earlier runs kept: each one's command is in the JSON beside this file)" * args.keep),
             "",
             f"Held-out Shakespeare ({', '.join(d.name for d in shakespeare_split().validation)}), float32 weights. "
             f"Each window: {args.windows} windows per context, the first context - {args.score} tokens prefilled, the "
             f"last {args.score} scored token by token through the engine; reference: float32 KV, nothing dropped, "
             "in lockstep. Bytes: what a request held at its end, scales included.", "",
             "| context | config | ppl | vs float32 | top-1 agreement | mean KL | KV bytes/token | x bf16 "
             "| sequences in 1 GiB |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        per_token = r["kv_bytes_held"] / r["context"]
        lines.append(f"| {r['context']} | {r['config']} | {r['ppl']:.3f} | {r['ppl'] / r['reference_ppl'] - 1:+.2%} "
                     f"| {r['top1_agreement']:.4f} | {r['mean_kl']:.2e} | {per_token:,.0f} | {per_token / bf16:.3f} "
                     f"| {int(GIB // r['kv_bytes_held'])} |")
    if needles:
        lines += ["", "Needle (a 5-digit number at 10% depth, asked at the end, greedy):", "",
                  "| config | " + " | ".join(f"{c} tokens" for c in sorted({n['context'] for n in needles})) + " |",
                  "|---|" + "---:|" * len({n["context"] for n in needles})]
        contexts = sorted({n["context"] for n in needles})
        for name in [name for name in names if any(n["config"] == name for n in needles)]:
            cells = [next((f"{n['passed']}/{n['trials']}" for n in needles if (n["config"], n["context"]) == (name, c)),
                          "not run") for c in contexts]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out.write_text("\n".join(lines) + "\n")
    plot(rows, bf16, out.with_suffix(".png"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--contexts", default="2048,4096", help="perplexity contexts ('' to skip)")
    parser.add_argument("--windows", type=int, default=2, help="windows per context (run together)")
    parser.add_argument("--score", type=int, default=256, help="tokens scored token by token at each window's end")
    parser.add_argument("--needle", default="1024,2048,4096", help="needle contexts ('' to skip)")
    parser.add_argument("--needle-trials", type=int, default=6)
    parser.add_argument("--needle-configs", default=None, help="the configs the needle runs for (default --configs)")
    parser.add_argument("--configs", default=",".join([*CONFIGS, *EVICTIONS]))
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "kv_compression.md"))
    parser.add_argument("--kv-recent", type=int, default=128, help="KIVI: the last tokens kept in float")
    parser.add_argument("--keep", action="store_true",
                        help="keep the results in --out's JSON that this run does not redo")
    args = parser.parse_args()
    names = args.configs.split(",")
    needle_names = args.needle_configs.split(",") if args.needle_configs else names
    unknown = sorted(name for name in set(names + needle_names) if not known(name))
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {', '.join([*CONFIGS, *EVICTIONS])} or DTYPE+EVICTION")
    command = shlex.join(["python", "scripts/bench_kv_compression.py", *sys.argv[1:]])
    contexts = [int(c) for c in args.contexts.split(",") if c]
    needle_contexts = [int(c) for c in args.needle.split(",") if c]
    base = jaxkv.load(args.model, dtype="float32")  # fp32 compute on CPU: its bf16 matvecs are slow
    ids = base.tokenizer.encode("\n\n".join(d.text for d in shakespeare_split().validation), add_special_tokens=False)
    bf16 = kv_bytes_per_token(base.config, "bfloat16")
    rows, needles = [], []
    saved = Path(args.out).with_suffix(".json")
    if args.keep and saved.exists():
        kept = json.loads(saved.read_text())
        rows = [r for r in kept["rows"] if not (r["config"] in names and r["context"] in contexts)]
        needles = [n for n in kept["needles"]
                   if not (n["config"] in needle_names and n["context"] in needle_contexts)]
    for context in contexts:
        # the reference runs once per context: every configuration compares with its recorded distributions
        reference = record(LLM(base.config, base.tokenizer, base.params, kv_dtype="float32"), ids, context=context,
                           prefill=context - args.score, batch=args.windows, max_windows=args.windows)
        for name in names:
            start = time.perf_counter()
            llm = model_for(base, name, context, args.kv_recent)
            result = perplexity(llm, ids, context=context, prefill=context - args.score,
                                batch=args.windows, reference=reference, max_windows=args.windows)
            row = {"config": name, **result.as_dict(), "seconds": round(time.perf_counter() - start, 1),
                   "command": command}
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_outputs(args, base, names, rows, needles, bf16)
    for context in needle_contexts:
        for name in needle_names:
            passed = needle_trials(model_for(base, name, context, args.kv_recent), ids, context, args.needle_trials,
                                   seed=context)
            needles.append({"config": name, "context": context, "passed": passed, "trials": args.needle_trials,
                            "command": command})
            print(json.dumps(needles[-1]), flush=True)
            write_outputs(args, base, names, rows, needles, bf16)
    print(f"wrote {args.out} and its PNG")


if __name__ == "__main__":
    main()
