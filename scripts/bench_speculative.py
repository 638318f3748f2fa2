"""Speculative decoding's speed on SmolLM2-135M: tokens/s with and without each proposer, same prompts, one run.

    python scripts/bench_speculative.py [--batches 1,16] [--kinds copy,plain] \\
        [--configs plain,ngram:4,ngram:8,ngram:16,ngram:8-always,draft:first-20:4] [--new-tokens 128] \\
        [--repeats 2] [--out docs/results/speculative.md]

Two kinds of prompt (chat, greedy, up to --new-tokens each, stopping at EOS):
- copy: the answer repeats its context: a held-out Shakespeare passage to copy with one word replaced, the first
  lines of a passage to quote, Python code to return with a variable renamed;
- plain: the answer is new text (a short poem, story or explanation on a topic): prompt lookup rarely guesses it.

Batch 1 runs one prompt of each template at a time; batch 16 runs 16 prompts in one call. Every configuration gets
the same prompts, and every repeat new ones (other passages, names and topics), so no run finds its prompts in the
prefix cache; configurations take turns within a repeat, so that they meet the machine's drift alike. Repeat 0
warms up (compiles, and times the step shapes the adaptive payoff uses) and is not reported; the table gives
medians over the other repeats of tokens/s (prompt and decode, compilation excluded) and of decode tokens/s, their
ratios to plain decoding, the acceptance rate and the tokens each verifying row emitted per step. `-always`
verifies whenever there are proposals (no payoff); `draft:first-N:K` drafts with SmolLM2's own first N layers.
Every configuration must produce plain decoding's tokens exactly; the script stops if one does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import jaxkv
from jaxkv.data.corpus import shakespeare_split
from jaxkv.serve.compiled import enable_compilation_cache
from jaxkv.serve.speculative import speculation

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["the sea", "a lighthouse keeper", "autumn leaves", "a lost key", "the first snow", "a city at night",
          "a robot learning to paint", "an old library", "the moon", "a mountain village", "a friendly dragon",
          "rain on a window", "a train journey", "a garden in spring", "the desert", "a clockmaker",
          "a river", "a market day", "a violin", "the northern lights", "a shipwreck", "a bakery at dawn",
          "a chess game", "a forest fire", "a kite", "a sleepy cat", "a bridge", "a storm at sea"]
FORMS = ["Write a short poem about {}.", "Tell a short story about {}.", "Explain why people love {}.",
         "Describe {} in a few sentences."]
NAMES = ["records", "items", "rows", "entries", "values", "samples", "orders", "events", "users", "tasks"]
CODE = '''def total_by_key({a}, key, field):
    totals = {{}}
    for entry in {a}:
        name = entry[key]
        totals[name] = totals.get(name, 0) + entry[field]
    return totals


def largest({a}, field):
    best = None
    for entry in {a}:
        if best is None or entry[field] > best[field]:
            best = entry
    return best


def count_where({a}, field, value):
    count = 0
    for entry in {a}:
        if entry[field] == value:
            count += 1
    return count
'''


def passages(n: int, run: int, chars: int = 600) -> list[str]:
    """n held-out Shakespeare passages of about `chars` characters starting at a line, different for every run."""
    text = "\n".join(doc.text for doc in shakespeare_split().validation)
    step = len(text) // (n * 8 + 1)
    out = []
    for i in range(n):
        start = text.find("\n", step * (run * n + i) % (len(text) - 2 * chars)) + 1
        end = text.rfind("\n", start, start + chars)
        out.append(text[start:end].strip())
    return out


def copy_prompts(n: int, run: int) -> list[str]:
    """Prompts whose answers repeat their context: edit a passage, quote a passage, rename a variable in code."""
    out = []
    for i, passage in enumerate(passages(n, run)):
        template = i % 3
        if template == 0:
            word = max(passage.split(), key=len).strip(",.;:!?'")
            out.append(f"Here is a passage:\n\n{passage}\n\nRewrite the whole passage exactly, but replace the word "
                       f"'{word}' with 'banana'.")
        elif template == 1:
            out.append(f"{passage}\n\nQuote the first six lines of the passage above, exactly as written.")
        else:
            old, new = NAMES[(run + i) % len(NAMES)], NAMES[(run + i + 3) % len(NAMES)]
            out.append(f"Rename the variable `{old}` to `{new}` in this Python code and reply with the whole "
                       f"code:\n\n{CODE.format(a=old)}")
    return out


def plain_prompts(n: int, run: int) -> list[str]:
    """Prompts whose answers are new text."""
    return [FORMS[(run + i) % len(FORMS)].format(TOPICS[(run * n + i) % len(TOPICS)]) for i in range(n)]


PROMPTS = {"copy": copy_prompts, "plain": plain_prompts}


def speculative(config: str):
    """plain -> None; ngram:K, draft:MODEL:K -> adaptive; ...-always -> verify whenever there are proposals."""
    if config == "plain":
        return None
    return dataclasses.replace(speculation(config.removesuffix("-always")), adaptive=not config.endswith("-always"))


def timed_run(llm, batch: int, kind: str, repeat: int, new_tokens: int) -> tuple[dict, list]:
    """One repeat of one configuration: its totals and the tokens of every prompt."""
    prompts = PROMPTS[kind](3 if batch == 1 else batch, repeat)
    totals = dict(new=0, run_s=0.0, decode_s=0.0, decode_tokens=0, proposed=0, accepted=0, verified=0, steps=0)
    ids = []
    for group in [[p] for p in prompts] if batch == 1 else [prompts]:
        out = llm.generate(group, max_new_tokens=new_tokens, chat=True)
        s = llm.stats
        ids += [c.token_ids for c in out]
        totals["new"] += s.new_tokens
        totals["run_s"] += s.prefill_s + s.decode_s
        totals["decode_s"] += s.decode_s
        totals["decode_tokens"] += s.new_tokens - len(group)  # the first token of each comes with its prompt
        for key in ("proposed", "accepted", "verified", "steps"):
            totals[key] += getattr(s, key)
    return totals, ids


def summary(runs: list[dict], batch: int) -> dict:
    """Medians of the timed repeats, and the speculation counts over all of them."""
    def total(key):
        return sum(r[key] for r in runs)

    return {"tokens_per_s": statistics.median(r["new"] / r["run_s"] for r in runs),
            "decode_tokens_per_s": statistics.median(r["decode_tokens"] / r["decode_s"] for r in runs),
            "acceptance": total("accepted") / max(1, total("proposed")),
            "tokens_per_verify": 1 + total("accepted") / max(1, total("verified")),
            "verified_share": total("verified") / max(1, total("steps") * batch),
            "new_tokens": total("new") / len(runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--kinds", default="copy,plain")
    parser.add_argument("--configs", default="plain,ngram:4,ngram:8,ngram:16,ngram:8-always,draft:first-20:4")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "speculative.md"))
    args = parser.parse_args()
    configs = args.configs.split(",")
    if configs[0] != "plain":
        parser.error("--configs must start with plain: every ratio is to it")
    enable_compilation_cache()  # the configurations share most step shapes: each compiles them once
    llms = {config: jaxkv.load(args.model, speculative=speculative(config)) for config in configs}
    results = []
    for batch in map(int, args.batches.split(",")):
        for kind in args.kinds.split(","):
            runs = {config: [] for config in configs}
            for repeat in range(args.repeats + 1):
                for config in configs:  # interleaved, so that every configuration meets the machine's drift alike
                    totals, ids = timed_run(llms[config], batch, kind, repeat, args.new_tokens)
                    if config == "plain":
                        plain_ids = ids
                    elif ids != plain_ids:
                        sys.exit(f"{config} at batch {batch} on {kind} prompts gave other tokens than plain decoding")
                    if repeat:
                        runs[config].append(totals)
                    print(f"  {config} batch {batch} {kind} repeat {repeat}: "
                          f"{totals['new'] / totals['run_s']:.1f} tokens/s, "
                          f"{totals['accepted']}/{totals['proposed']} kept, {totals['steps']} steps",
                          file=sys.stderr, flush=True)
            base = summary(runs["plain"], batch)
            for config in configs:
                result = summary(runs[config], batch)
                results.append(dict(batch=batch, kind=kind, config=config, **result,
                                    ratio=result["tokens_per_s"] / base["tokens_per_s"],
                                    decode_ratio=result["decode_tokens_per_s"] / base["decode_tokens_per_s"]))
    write(results, args)


def write(results: list[dict], args) -> None:
    command = "python scripts/bench_speculative.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = ["# Speculative decoding on SmolLM2-135M (CPU, float32)", "", f"Command: `{command.strip()}`", "",
             f"Run {time.strftime('%Y-%m-%d')}; {args.repeats} timed repeats after a warm-up, medians; chat prompts, "
             f"greedy, up to {args.new_tokens} new tokens. Every configuration produced plain decoding's tokens.", "",
             "| batch | prompts | config | tokens/s | x plain | decode tokens/s | x plain | acceptance | "
             "tokens per verify | rows verifying |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        spec = r["config"] != "plain"
        lines.append(f"| {r['batch']} | {r['kind']} | {r['config']} | {r['tokens_per_s']:.1f} | {r['ratio']:.2f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['decode_ratio']:.2f} | "
                     + (f"{r['acceptance']:.2f} | {r['tokens_per_verify']:.2f} | {r['verified_share']:.0%} |"
                        if spec else "| | |"))
    lines += ["", __doc__.split("\n\n", 2)[2].strip(), ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
