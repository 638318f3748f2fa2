"""Paged decode attention: kernel time and achieved bandwidth against the reference and upstream's kernels.

For each context length, one decode step (one query token per sequence) attends over a paged KV cache
whose pages are scattered at random through a pool (fixed seed). Every backend runs on the same inputs:

  gpu, tpu         pallas_kernels.paged_attention's Pallas kernels (Triton, Mosaic TPU)
  reference        its pure-JAX reference (jitted)
  upstream-gpu/tpu jax.experimental.pallas.ops.{gpu,tpu}.paged_attention, with equivalent parameters: q
                   pre-scaled (they take no softmax scale), no sinks/window, int8 pages with their scales
                   (upstream-tpu wants them as a QuantizedTensor and broadcasts them to [K, N, S, head_dim])

Correctness first: each output is compared with the reference run on a float32 q at "highest" matmul
precision (max |a - b| / max |b|, so bf16 outputs show their rounding, ~3e-3); beyond 2e-2 (bfloat16) or
1e-4 (float32) the script exits non-zero (upstream-tpu rounds K/V to bf16, so it always gets 2e-2); an
upstream kernel that cannot run is reported in its row instead. Then each backend is compiled once and
timed `--repeats` times; a sample is `--inner` calls dispatched back to back and blocked on once, divided
by `--inner` (amortizing the ~10 us Python dispatch that would otherwise swamp short kernels).

The table gives the median and p10/p90 in microseconds and GB/s = bytes / median, where bytes = the K/V
pages (and int8 scales) the query can see (with a window: the sink and window pages only) + q + the
output; "% of peak" divides by the device's HBM bandwidth when known (H100 SXM 3.35 TB/s, H200 4.8 TB/s).
"/ upstream" and "/ reference" are time ratios (below 1: faster). Contexts whose K/V fits in L2 (50 MB
on an H100) may read faster than HBM allows.

On a GPU VM (the defaults: batch 8, 32 query / 8 KV heads, head_dim 128, bfloat16, pages of 16):

    .venv/bin/python scripts/bench_attention.py --contexts 1024,4096,16384 \
        --out docs/results/bench_attention.md --plot docs/results/bench_attention.png

CPU smoke check (kernels interpreted, timings meaningless and flagged so):

    python scripts/bench_attention.py --contexts 64,128 --batch 2 --q-heads 4 --kv-heads 2 --head-dim 64 \
        --dtype float32 --repeats 3 --backends reference,gpu,tpu,upstream-gpu --interpret
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from pallas_kernels import paged_attention
from pallas_kernels.paged_attention import reference

KERNELS = ("gpu", "tpu")
BACKENDS = ("reference", *KERNELS, *(f"upstream-{k}" for k in KERNELS))
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
PEAK_BYTES_PER_S = [("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("H200", 4.8e12),
                    ("TPU v5 lite", 8.19e11), ("TPU v5", 2.765e12), ("TPU v6 lite", 1.64e12), ("TPU v4", 1.228e12)]
COLUMNS = ["context", "backend", "median us", "p10 us", "p90 us", "GB/s", "% of peak", "/ upstream",
           "/ reference", "rel. error", "note"]


class Unavailable(Exception):
    """A backend that cannot run these inputs here; the message goes in the table's note."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="1024,4096,16384", help="tokens per sequence, comma separated")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(TOLERANCE), default="bfloat16")
    p.add_argument("--kv-dtype", choices=["same", "int8"], default="same", help="int8: pages + float32 scales")
    p.add_argument("--sinks", type=int, default=0)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--ragged", action="store_true", help="random lengths in [1, context] (one at context)")
    p.add_argument("--backends", default=None, help=f"comma separated from {', '.join(BACKENDS)}, upstream "
                   "(the platform's); default: the platform's kernel, reference, upstream")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--inner", type=int, default=None, help="calls per timed sample (default 10, 1 on CPU)")
    p.add_argument("--interpret", action="store_true", help="run kernels interpreted (CPU smoke check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the table as markdown, with the command, device and jax version")
    p.add_argument("--plot", help="write GB/s against context per backend as a PNG")
    return p.parse_args(argv)


def backend_list(spec: str | None, interpret: bool) -> list[str]:
    platform = jax.default_backend()
    kernel = platform if platform in KERNELS else "gpu"
    if spec is None:
        names = [kernel, "reference", "upstream"] if platform in KERNELS else (
            list(BACKENDS) if interpret else ["reference"])
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
    names = [f"upstream-{kernel}" if n == "upstream" else n for n in names]
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown:
        raise SystemExit(f"bench_attention: unknown backends {unknown}; choose from {', '.join(BACKENDS)}, upstream")
    return list(dict.fromkeys(names))


def make_inputs(context: int, args) -> dict:
    """q, pages scattered through a pool with spare pages, block tables, lengths and (int8) scales."""
    rng = np.random.default_rng(args.seed + context)
    keys = jax.random.split(jax.random.key(args.seed + context), 5)
    batch, pages_per_seq = args.batch, -(-context // args.page_size)
    n_pages = batch * pages_per_seq + batch
    pool = (args.kv_heads, n_pages, args.page_size, args.head_dim)
    lengths = np.full(batch, context)
    if args.ragged:
        lengths = rng.integers(1, context + 1, batch)
        lengths[0] = context
    x = dict(q=jax.random.normal(keys[0], (batch, args.q_heads, args.head_dim), args.dtype),
             block_tables=jnp.asarray(rng.permutation(n_pages)[:batch * pages_per_seq].reshape(batch, -1),
                                      jnp.int32),
             lengths=jnp.asarray(lengths, jnp.int32), k_scales=None, v_scales=None)
    for i, name in enumerate(("k", "v")):
        if args.kv_dtype == "int8":
            x[f"{name}_pages"] = jax.random.randint(keys[1 + i], pool, -127, 127, jnp.int8)
            x[f"{name}_scales"] = jax.random.uniform(keys[3 + i], pool[:3], jnp.float32, 0.004, 0.012)
        else:
            x[f"{name}_pages"] = jax.random.normal(keys[1 + i], pool, args.dtype)
    return x


def bytes_moved(x: dict, args) -> int:
    """K/V (+ scales) bytes of the pages each sequence can see, plus q and the output."""
    size, length = args.page_size, np.asarray(x["lengths"])
    pages = -(-length // size)
    if args.window is not None:
        n_sink = -(-np.minimum(length, args.sinks) // size)
        first = np.maximum(np.maximum(length - args.window, 0) // size, n_sink)
        pages = n_sink + np.maximum(pages - first, 0)
    per_page = 2 * args.kv_heads * size * (args.head_dim * x["k_pages"].dtype.itemsize
                                           + (4 if args.kv_dtype == "int8" else 0))
    return int(pages.sum()) * per_page + 2 * x["q"].size * x["q"].dtype.itemsize


def largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, max(at_most, 1)) + 1) if n % d == 0)


def runner(name: str, x: dict, args):
    """(jitted function, its arguments, context to call it in) for one backend, or raise Unavailable."""
    q, kp, vp, bt, lengths, ks, vs = (x[k] for k in ("q", "k_pages", "v_pages", "block_tables", "lengths",
                                                     "k_scales", "v_scales"))
    platform = name.removeprefix("upstream-")
    if name != "reference" and not args.interpret and jax.default_backend() != platform:
        raise Unavailable(f"n/a (needs a {platform} or --interpret)")
    if name in ("reference", *KERNELS):
        fn = jax.jit(lambda *a: paged_attention(*a[:5], k_scales=a[5], v_scales=a[6], sinks=args.sinks,
                                                window=args.window, backend=name, interpret=args.interpret))
        return fn, (q, kp, vp, bt, lengths, ks, vs), contextlib.nullcontext()
    if args.window is not None:
        raise Unavailable("n/a (upstream has no sinks/window)")
    q = (q.astype(jnp.float32) * args.head_dim ** -0.5).astype(q.dtype)  # upstream takes no softmax scale
    pages_per_seq, block_pages = bt.shape[1], max(1, 128 // args.page_size)  # 128-token blocks, as upstream's
    if name == "upstream-gpu":
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as upstream_gpu
        splits = largest_divisor(pages_per_seq, 16)  # upstream's default k_splits, if it divides the table
        block = largest_divisor(pages_per_seq // splits, block_pages)
        fn = jax.jit(lambda *a: upstream_gpu(*a, k_splits=splits, pages_per_compute_block=block,
                                             interpret=args.interpret))
        return fn, (q, kp, vp, bt, lengths, ks, vs), contextlib.nullcontext()
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as upstream_tpu
    from jax.experimental.pallas.ops.tpu.paged_attention.quantization_utils import QuantizedTensor
    if ks is not None:  # upstream dequantizes as int8 * h / 127.5, per (token, head) here
        kp, vp = QuantizedTensor(kp, ks[..., None] * 127.5), QuantizedTensor(vp, vs[..., None] * 127.5)
    block = largest_divisor(pages_per_seq, block_pages)
    fn = jax.jit(lambda *a: upstream_tpu(*a, pages_per_compute_block=block))
    return fn, (q, kp, vp, lengths, bt), (pltpu.force_tpu_interpret_mode() if args.interpret
                                          else contextlib.nullcontext())


def measure(name: str, x: dict, truth, args) -> dict:
    """One table row: compile, check against the truth, time."""
    row = {"backend": name, "note": ""}
    try:
        fn, fn_args, ctx = runner(name, x, args)
        with ctx:
            out = jax.block_until_ready(fn(*fn_args))  # compile and warm up
            a, b = np.asarray(out, np.float64), np.asarray(truth, np.float64)
            row["error"] = float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))
            samples = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for _ in range(args.inner):
                    out = fn(*fn_args)
                jax.block_until_ready(out)
                samples.append((time.perf_counter() - start) / args.inner * 1e6)
        row["median"], row["p10"], row["p90"] = np.percentile(samples, [50, 10, 90])
    except Unavailable as e:
        row["note"] = str(e)
    except Exception as e:  # noqa: BLE001 - reported in the row; our own backends then fail the run
        row["note"], row["failed"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", True
    tolerance = TOLERANCE["bfloat16" if name == "upstream-tpu" else args.dtype]
    if name == "upstream-tpu" and args.dtype == "float32" and "error" in row:
        row["note"] = "upstream-tpu rounds K/V to bf16 (bf16 tolerance)"
    if "error" in row and not row["error"] <= tolerance:  # NaN included
        row["note"], row["failed"] = f"MISMATCH > {tolerance:g}", True
    if args.interpret and name != "reference" and "median" in row:
        row["note"] = "; ".join(filter(None, ["interpret: timing meaningless", row["note"]]))
    return row


def cells(row: dict) -> list[str]:
    def num(key, fmt):
        return format(row[key], fmt) if row.get(key) is not None else ""
    return [str(row["context"]), row["backend"], num("median", ".1f"), num("p10", ".1f"), num("p90", ".1f"),
            num("gbps", ".4g"), num("peak", ".0f"), num("vs_upstream", ".2f"), num("vs_reference", ".2f"),
            num("error", ".1e"), row["note"]]


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def plot(rows: list[dict], peak: float | None, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["backend"] for r in rows):
        points = [(r["context"], r["gbps"]) for r in rows if r["backend"] == name and "gbps" in r]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    if peak:
        ax.axhline(peak / 1e9, ls="--", c="gray", label="HBM peak")
        ax.axhline(0.6 * peak / 1e9, ls=":", c="gray", label="60% of peak")
    contexts = sorted({r["context"] for r in rows})
    ax.set(xscale="log", xlabel="context (tokens)", ylabel="GB/s", title="paged decode attention")
    ax.set_xticks(contexts, [str(c) for c in contexts], minor=False)
    ax.set_xticks([], minor=True)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    names = backend_list(args.backends, args.interpret)
    args.inner = args.inner or (1 if args.interpret or jax.default_backend() == "cpu" else 10)
    device = jax.devices()[0].device_kind
    peak = next((bw for key, bw in PEAK_BYTES_PER_S if key.lower() in device.lower()), None)
    contexts = [int(c) for c in args.contexts.split(",")]
    progress = tqdm(total=len(contexts) * len(names), desc="bench_attention", leave=False, file=sys.stderr)
    rows = []
    for context in contexts:
        x = make_inputs(context, args)
        with jax.default_matmul_precision("highest"):  # float32 q and output: the truth is not rounded to bf16
            truth = jax.block_until_ready(reference.paged_attention(
                x["q"].astype(jnp.float32), x["k_pages"], x["v_pages"], x["block_tables"], x["lengths"],
                k_scales=x["k_scales"], v_scales=x["v_scales"], scale=args.head_dim ** -0.5, softcap=None,
                sinks=args.sinks, window=args.window))
        done = {}
        for name in names:
            progress.set_postfix_str(f"{context} {name}")
            done[name] = measure(name, x, truth, args) | {"context": context, "bytes": bytes_moved(x, args)}
            progress.update()
        for name, row in done.items():
            if "median" not in row:
                continue
            row["gbps"] = row["bytes"] / row["median"] / 1e3  # bytes / us / 1e3 = GB/s
            row["peak"] = 100 * row["gbps"] * 1e9 / peak if peak else None
            upstream = done.get(f"upstream-{name}", {}).get("median")
            row["vs_upstream"] = row["median"] / upstream if upstream and name in KERNELS else None
            ref = done.get("reference", {}).get("median")
            row["vs_reference"] = row["median"] / ref if ref and name != "reference" else None
        rows += done.values()
    progress.close()

    text = table([cells(r) for r in rows])
    command = shlex.join(["python", "scripts/bench_attention.py", *argv])
    kv = "int8 + float32 scales" if args.kv_dtype == "int8" else args.dtype
    header = (f"Device: {device} ({jax.default_backend()}, peak HBM "
              f"{f'{peak / 1e12:.2f} TB/s' if peak else 'unknown'}); jax {jax.__version__}\n"
              f"Config: batch {args.batch}, {args.q_heads} q / {args.kv_heads} kv heads, head_dim {args.head_dim}, "
              f"pages of {args.page_size}, q {args.dtype}, kv {kv}, sinks {args.sinks}, window {args.window}, "
              f"{'ragged' if args.ragged else 'equal'} lengths; {args.repeats} samples of {args.inner} calls")
    print(f"{header}\n\n{text}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        notes = ("Times per call in microseconds; GB/s = visible K/V (+ scales) + q + output bytes / median; "
                 "/ upstream and / reference are time ratios (below 1: faster).")
        Path(args.out).write_text(f"# Paged decode attention: {device}\n\n```bash\n{command}\n```\n\n"
                                  f"{header.replace(chr(10), '  ' + chr(10))}\n\n{notes}\n\n{text}\n")
    if args.plot:
        plot(rows, peak, args.plot)
    failed = [f"{r['context']} {r['backend']}: {r['note']}" for r in rows
              if r.get("failed") and not (r["backend"].startswith("upstream") and "MISMATCH" not in r["note"])]
    if failed:
        print("bench_attention: FAILED\n  " + "\n  ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
