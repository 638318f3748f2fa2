"""Train several KV-sharing variants of one model on the same data, steps and seed; compare.

    python scripts/compare_kv_sharing.py                 # the committed docs/results/kv_sharing.*
    python scripts/compare_kv_sharing.py --steps 3 --out /tmp/cmp --results /tmp/cmp   # smoke run

Each map trains from the same base train config with `model.kv_sharing` set to it. The
script writes a Markdown table (validation perplexity, KV bytes/token, parameters, median
step time, each against the standard model) and a PNG of the validation-loss curves. Runs
resume from their own directories, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from pathlib import Path

import jax
import numpy as np

from jaxkv.checkpoints.store import load_checkpoint
from jaxkv.data.corpus import load_split
from jaxkv.data.tokens import eval_batches, packed_rows
from jaxkv.train import train
from jaxkv.train.config import TrainConfig
from jaxkv.train.trainer import mean_nll

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MAPS = ("standard", "cla:2", "lckv:2", "sandwich-middle:4")


def run(base: TrainConfig, specs: list[str], out: Path, steps: int | None) -> dict:
    results = {}
    for spec in specs:
        cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, kv_sharing=spec))
        print(f"== {spec}", file=sys.stderr)
        results[spec] = train(cfg, steps=steps, out=out / spec.replace(":", ""))
    return results


def fixed_point_ppl(base: TrainConfig, result, n_batches: int = 4) -> tuple[float, float] | None:
    """Validation perplexity of a model with upward KV sources on the first `n_batches` batches:
    with its trained number of passes, and at the fixed point that token-by-token decoding
    gives (seq_len passes make every position exact). None for maps without upward sources."""
    cfg, tokenizer, params = load_checkpoint(result.final)
    if not cfg.has_upward_sources():
        return None
    d = base.data
    split = load_split(d.source, d.validation, d.validation_fraction, d.jsonl_field)
    batches = eval_batches(packed_rows(split.validation, tokenizer, d.seq_len, "validation"),
                           base.train.microbatch, n_batches)
    nll = jax.jit(mean_nll, static_argnums=0)
    exact = cfg.replace(upward_passes_no_grad=d.seq_len)
    return tuple(float(np.exp(np.mean([nll(c, params, b) for b in batches]))) for c in (cfg, exact))


def table(base_cfg: TrainConfig, results: dict, fixed_point_batches: int) -> str:
    base = results[next(iter(results))]
    lines = ["| KV sharing | KV layers / layers | val ppl | val loss | KV bytes/token | parameters | step time (s) "
             f"| val ppl, {fixed_point_batches} batches: trained passes / fixed point |", "|---|---|---|---|---|---|---|---|"]
    for spec, r in results.items():
        cfg = json.loads((r.final / "config.json").read_text())
        kv_layers = sum(1 for i, s in enumerate(cfg["kv_sources"]) if i == s)
        fixed = fixed_point_ppl(base_cfg, r, fixed_point_batches)
        lines.append(
            f"| {spec} | {kv_layers} / {cfg['n_layers']} | {r.val_ppl:.2f} ({r.val_ppl / base.val_ppl:.3f}x) "
            f"| {r.val_loss:.4f} | {r.kv_bytes_per_token:,} ({r.kv_bytes_per_token / base.kv_bytes_per_token:.2f}x) "
            f"| {r.parameters:,} ({r.parameters / base.parameters:.3f}x) "
            f"| {r.step_time_s:.3f} ({r.step_time_s / base.step_time_s:.2f}x) "
            f"| {f'{fixed[0]:.3f} / {fixed[1]:.3f}' if fixed else 'n/a (no upward sources)'} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for spec, r in results.items():
        ax.plot([e["step"] for e in r.evals], [e["val_loss"] for e in r.evals], marker="o", ms=3, label=spec)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("KV sharing: validation loss, same data, steps and seed")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "train" / "compare-kv-sharing.yaml"))
    parser.add_argument("--maps", default=",".join(DEFAULT_MAPS), help="comma-separated kv_sharing specs")
    parser.add_argument("--steps", type=int, default=None, help="override the config's steps")
    parser.add_argument("--out", default=str(ROOT / "runs" / "compare-kv-sharing"), help="run directories")
    parser.add_argument("--fixed-point-batches", type=int, default=4,
                        help="validation batches for the fixed-point perplexity of upward maps")
    parser.add_argument("--results", default=str(ROOT / "docs" / "results"), help="where the table and PNG go")
    args = parser.parse_args()

    base = TrainConfig.load(args.config)
    results = run(base, args.maps.split(","), Path(args.out), args.steps)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "kv_sharing_val_loss.png")
    command = " ".join(["python", "scripts/compare_kv_sharing.py", *sys.argv[1:]])
    t = base.train
    text = (f"# KV sharing compared\n\nCommand: `{command}` (config `{Path(args.config).name}`)\n\n"
            f"Machine: {platform.machine()}, {jax.device_count()} {jax.default_backend()} device(s), "
            f"{len(os.sched_getaffinity(0))} cores. Steps {results[next(iter(results))].steps}, batch "
            f"{t.batch_size} x {base.data.seq_len} tokens, seed {t.seed}; ratios are against the first row.\n\n"
            f"{table(base, results, args.fixed_point_batches)}\n\n![validation loss](kv_sharing_val_loss.png)\n")
    (out / "kv_sharing.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
