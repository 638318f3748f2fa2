"""The `jaxkv` command line: a thin wrapper over the Python API. Errors print one line."""

from __future__ import annotations

import argparse
import json
import os
import sys


# As jaxkv.config.DTYPES, spelled here so that `jaxkv --help` does not import JAX.
_DTYPES = ("float32", "bfloat16", "float16")
_KV_DTYPES = _DTYPES + ("int8", "fp8", "int4", "kivi2", "kivi4")  # as jaxkv.cache.quantize.KV_DTYPES
_EVICTIONS = ("h2o", "snapkv")  # as jaxkv.cache.eviction.METHODS


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _kv_arguments(args) -> dict:
    return dict(kv_rotate=args.kv_rotate, kv_budget=args.kv_budget, eviction=args.eviction,
                eviction_window=args.eviction_window, eviction_sinks=args.eviction_sinks, kv_recent=args.kv_recent)


def _generate(args) -> None:
    import jaxkv

    llm = jaxkv.load(args.model, dtype=args.dtype, kv_dtype=args.kv_dtype, page_size=args.page_size,
                     streaming_window=args.streaming_window, sinks=args.sinks, mesh=args.mesh,
                     speculative=args.speculative, **_kv_arguments(args))
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, stop=args.stop, chat=args.chat, ignore_eos=args.ignore_eos)
    if not args.json:  # the text as it is generated
        for piece in llm.stream(args.prompt, **options):
            print(piece, end="", flush=True)
        print()
        stats = llm.stats
        print(f"[{stats.prompt_tokens} prompt tokens, {stats.new_tokens} generated, "
              f"{stats.tokens_per_s:.1f} tok/s (compile {stats.compile_s:.1f}s), KV {llm.kv_bytes_per_token} B/token]",
              file=sys.stderr)
        return
    out = llm.generate(args.prompt, **options)
    stats = llm.stats
    print(json.dumps({
        "text": out.text, "token_ids": out.token_ids, "prompt_tokens": out.prompt_tokens,
        "tokens_per_s": round(stats.tokens_per_s, 3), "kv_bytes_per_token": llm.kv_bytes_per_token,
        "finish_reason": out.finish_reason, "steps": stats.steps,
        **({"speculative_acceptance_rate": round(stats.acceptance_rate, 4),
            "speculative_tokens_per_verify": round(stats.tokens_per_verify, 4)} if llm.speculative else {}),
    }))


def _perplexity(args) -> None:
    from pathlib import Path

    import jaxkv
    from jaxkv.api import LLM
    from jaxkv.errors import JaxkvError
    from jaxkv.eval import perplexity

    from jaxkv.eval.perplexity import check_context

    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JaxkvError(f"cannot read text file {args.file}: {e}") from None
    check_context(args.context)  # fails before the model loads
    llm = jaxkv.load(args.model, dtype=args.dtype, kv_dtype=args.kv_dtype, page_size=args.page_size,
                     streaming_window=args.streaming_window, sinks=args.sinks, **_kv_arguments(args))
    reference = None
    if args.reference:  # the same weights, float32 KV, nothing dropped
        reference = LLM(llm.config.replace(streaming_window=None, kv_rotate=False), llm.tokenizer, llm.params,
                        kv_dtype="float32", page_size=llm.page_size)
    result = perplexity(llm, llm.tokenizer.encode(text), context=args.context, prefill=args.prefill,
                        batch=args.batch, reference=reference, max_windows=args.max_windows, progress=not args.json)
    if args.json:
        print(json.dumps(result.as_dict()))
        return
    line = (f"perplexity {result.ppl:.4f} over {result.tokens} tokens ({result.windows} windows of {result.context}, "
            f"{result.prefill} prefilled); KV {result.kv_dtype}: {result.kv_bytes_per_token} B/token, "
            f"{result.kv_bytes_held / 2**20:.2f} MiB held per window")
    if reference is not None:
        line += (f"; reference (float32 KV) {result.reference_ppl:.4f}, top-1 agreement {result.top1_agreement:.4f}, "
                 f"mean KL {result.mean_kl:.3g}")
    print(line)


def _serve(args) -> None:
    from jaxkv.serve.requests import Limits
    from jaxkv.serve.server import serve

    limits = Limits(max_body_bytes=args.max_body_bytes, max_prompt_chars=args.max_prompt_chars,
                    max_messages=args.max_messages, max_stop_strings=args.max_stop_strings,
                    max_stop_chars=args.max_stop_chars, max_waiting=args.max_waiting,
                    request_timeout_s=args.request_timeout or None)
    hosts = tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()) if args.allowed_hosts else None
    serve(args.model, host=args.host, port=args.port, dtype=args.dtype, kv_dtype=args.kv_dtype,
          page_size=args.page_size, num_pages=args.num_pages, max_batch=args.max_batch,
          prefill_chunk=args.prefill_chunk, prefill_budget=args.prefill_budget,
          prefix_caching=not args.no_prefix_caching, max_context=args.max_context,
          streaming_window=args.streaming_window, sinks=args.sinks, mesh=args.mesh,
          model_name=args.served_model_name, log_level=args.log_level, limits=limits, api_key=args.api_key,
          allowed_hosts=hosts, timeout_keep_alive=args.timeout_keep_alive, speculative=args.speculative,
          **_kv_arguments(args),
          window_pages=not args.no_window_pages)


def _serve_limits(group) -> None:
    from jaxkv.serve.requests import Limits

    d = Limits()
    group.add_argument("--api-key", default=None, metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on every /v1 endpoint (default: $JAXKV_API_KEY; "
                            "/health and /metrics stay open)")
    group.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                       help="comma-separated Host header names answered, '*' for any (default: the loopback "
                            "names when listening on loopback, else any)")
    group.add_argument("--timeout-keep-alive", type=int, default=5, metavar="S",
                       help="close a connection with no request under way for this long (default: 5)")
    group.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, metavar="N",
                       help=f"largest request body; 413 past it (default: {d.max_body_bytes})")
    group.add_argument("--max-prompt-chars", type=int, default=None, metavar="N",
                       help="longest prompt in characters, checked before tokenizing (default: 32 per token "
                            "of the longest prompt the engine takes)")
    group.add_argument("--max-messages", type=int, default=d.max_messages, metavar="N",
                       help=f"most messages in a chat request (default: {d.max_messages})")
    group.add_argument("--max-stop-strings", type=int, default=d.max_stop_strings, metavar="N",
                       help=f"most stop strings per request (default: {d.max_stop_strings})")
    group.add_argument("--max-stop-chars", type=int, default=d.max_stop_chars, metavar="N",
                       help=f"longest stop string (default: {d.max_stop_chars})")
    group.add_argument("--max-waiting", type=int, default=d.max_waiting, metavar="N",
                       help=f"requests queued for a row; more get 429 with Retry-After (default: {d.max_waiting})")
    group.add_argument("--request-timeout", type=float, default=d.request_timeout_s, metavar="S",
                       help=f"end a request this long after it arrived, 0 for never (default: "
                            f"{d.request_timeout_s:g})")


def _convert(args) -> None:
    from pathlib import Path

    from jaxkv.checkpoints.registry import open_source
    from jaxkv.checkpoints.store import convert
    from jaxkv.errors import JaxkvError

    if args.to_hf:
        from jaxkv.api import load
        from jaxkv.checkpoints.export import export_hf, export_target

        export_target(args.to_hf)  # before loading: a refusal should not wait for a large model
        out = export_hf(load(args.gguf or args.hf or args.model, dtype=args.dtype), args.to_hf)
    elif args.model:
        raise JaxkvError("--model converts only to HF (--to-hf DIR): presets and Hub ids become jaxkv checkpoints "
                         "on first use")
    else:
        out = convert(open_source(Path(args.gguf or args.hf).expanduser()), args.out, name=args.name,
                      dtype=args.dtype)
    print(f"wrote {out}", file=sys.stderr)


def _plan(args) -> None:
    from jaxkv.checkpoints.registry import resolve_config
    from jaxkv.plan import format_bytes, parse_bytes, plan
    from jaxkv.sharing import to_string, with_sharing

    base = resolve_config(args.model)
    memory = parse_bytes(args.memory) if args.memory else None
    rows = {"baseline": plan(base, args.context, args.batch, args.kv_dtype, memory)}
    if args.kv_sharing:
        shared = with_sharing(base, args.kv_sharing)
        rows[args.kv_sharing] = plan(shared, args.context, args.batch, args.kv_dtype, memory)
    if args.plot:
        _plan_plot(args, base, shared if args.kv_sharing else None, memory)
    if args.json:
        print(json.dumps({"model": base.name, "context": args.context, "batch": args.batch, "memory": memory,
                          "plans": rows}))
        return
    print(f"{base.name}: {base.n_layers} layers, {base.n_kv_heads} KV heads of {base.head_dim}; "
          f"batch {args.batch} x context {args.context}")
    fields = [("KV layers", lambda r: str(r["kv_layers"])),
              ("KV bytes/token", lambda r: f"{r['kv_bytes_per_token']:,} ({r['kv_dtype']})"),
              ("KV held per sequence", lambda r: format_bytes(r["kv_bytes_per_sequence"])),
              ("KV for batch x context", lambda r: format_bytes(r["kv_bytes"])),
              ("parameters", lambda r: f"{r['parameters']:,}"),
              ("weights", lambda r: format_bytes(r["weight_bytes"]))]
    if memory is not None:
        fields.append((f"max batch in {format_bytes(memory)}", lambda r: f"{r['max_batch']:,}"))
    width = max(len(name) for name, _ in fields)
    print(" " * width + "".join(f"  {name:>24}" for name in rows))
    for name, show in fields:
        print(f"{name:<{width}}" + "".join(f"  {show(r):>24}" for r in rows.values()))
    if args.kv_sharing:
        print(f"kv_sources: {to_string(shared.kv_sources, shared.window_layers)}")


def _plan_plot(args, base, shared, memory) -> None:
    """The plan's figure (`jaxkv.plan.plot_plan`): the baseline in the model's KV dtype, and what the flags chose."""
    from jaxkv.errors import JaxkvError
    from jaxkv.plan import plot_plan

    chosen = args.kv_dtype or base.dtype
    variants = {f"baseline ({base.dtype} KV)": (base, None)}
    if args.kv_dtype and args.kv_dtype != base.dtype:
        variants[f"baseline ({chosen} KV)"] = (base, args.kv_dtype)
    if shared is not None:
        variants[f"{args.kv_sharing} ({chosen} KV)"] = (shared, args.kv_dtype)
    figure = plot_plan(variants, args.context, memory)
    try:
        figure.savefig(args.plot, dpi=120)
    except (OSError, ValueError) as e:  # a missing folder, an unknown extension
        raise JaxkvError(f"cannot write the plot to {args.plot}: {e}") from None
    print(f"wrote {args.plot}", file=sys.stderr)


def _env(args) -> None:
    from jaxkv.env import environment, format_environment

    env = environment()
    print(json.dumps(env, indent=2) if args.json else format_environment(env))


def _train(args) -> None:
    from jaxkv.train import train

    result = train(args.config, steps=args.steps, out=args.out, mesh=args.mesh)
    print(f"wrote {result.final}: step {result.steps}, loss {result.loss:.4f}, val_loss {result.val_loss:.4f} "
          f"(ppl {result.val_ppl:.2f}), {result.parameters:,} parameters, {result.tokens_per_s:,.0f} tok/s",
          file=sys.stderr)


MESH_HELP = "shard over devices, e.g. data=2,model=4 (axes data, fsdp, seq, model; -1: the rest)"


def build_parser() -> argparse.ArgumentParser:
    from jaxkv.env import version

    parser = _Parser(prog="jaxkv", description="JAX LLM inference where the KV cache is the limit.")
    parser.add_argument("--version", action="version", version=f"jaxkv {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("--model", default="smollm2-135m",
                     help="preset name, jaxkv checkpoint dir, HF dir, GGUF file or Hub id org/name[@revision] "
                          "(default: smollm2-135m)")
    gen.add_argument("--prompt", required=True, help="prompt text, used as is")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens, past EOS")
    gen.add_argument("--dtype", choices=_DTYPES, default=None,
                     help="compute and parameter dtype (default: the checkpoint's)")
    gen.add_argument("--kv-dtype", choices=_KV_DTYPES, default=None,
                     help="KV cache dtype (default: the compute dtype; int8, fp8 (e4m3), int4 and KIVI 2/4-bit "
                          "quantize the pages)")
    gen.add_argument("--page-size", type=int, default=None,
                     help="tokens per KV page, a power of two (default: 16; 32 for KIVI)")
    gen.add_argument("--streaming-window", type=int, default=None, metavar="TOKENS",
                     help="StreamingLLM: keep only the sinks and this many recent tokens, and generate past "
                          "the model's context in bounded memory")
    gen.add_argument("--sinks", type=int, default=4, help="attention sinks kept under --streaming-window")
    _kv_compression(gen)
    _speculative(gen)
    _compilation_cache(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object on stdout when done (default: the "
                     "text as it is generated, then counts and speed on stderr)")
    gen.add_argument("--mesh", default=None, metavar="SPEC", help=MESH_HELP)
    gen.set_defaults(func=_generate)

    ppl = sub.add_parser("perplexity", help="perplexity of a text file through the serving runtime (KV compression "
                                            "acts as in serving)")
    ppl.add_argument("--model", default="smollm2-135m",
                     help="preset name, jaxkv checkpoint dir, HF dir, GGUF file or Hub id (default: smollm2-135m)")
    ppl.add_argument("--file", required=True, help="UTF-8 text file")
    ppl.add_argument("--context", type=int, default=1024, help="tokens per window (default: 1024)")
    ppl.add_argument("--prefill", type=int, default=None,
                     help="prompt tokens per window, prefilled; the rest are scored token by token (default: half)")
    ppl.add_argument("--batch", type=int, default=8, help="windows run together (default: 8)")
    ppl.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    ppl.add_argument("--reference", action="store_true",
                     help="also run float32 KV without compression: top-1 agreement and mean KL against it")
    ppl.add_argument("--dtype", choices=_DTYPES, default=None,
                     help="compute and parameter dtype (default: the checkpoint's)")
    ppl.add_argument("--kv-dtype", choices=_KV_DTYPES, default=None,
                     help="KV cache dtype (default: the compute dtype; int8, fp8 (e4m3), int4 and KIVI 2/4-bit "
                          "quantize the pages)")
    ppl.add_argument("--page-size", type=int, default=None,
                     help="tokens per KV page, a power of two (default: 16; 32 for KIVI)")
    ppl.add_argument("--streaming-window", type=int, default=None, metavar="TOKENS",
                     help="StreamingLLM: keep only the sinks and this many recent tokens")
    ppl.add_argument("--sinks", type=int, default=4, help="attention sinks kept under --streaming-window")
    _kv_compression(ppl)
    _compilation_cache(ppl)
    ppl.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ppl.set_defaults(func=_perplexity)

    srv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    srv.add_argument("--model", default="smollm2-135m",
                     help="preset name, jaxkv checkpoint dir, HF dir, GGUF file or Hub id org/name[@revision] "
                          "(default: smollm2-135m)")
    srv.add_argument("--mesh", default=None, metavar="SPEC", help=MESH_HELP)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    srv.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default: 8)")
    srv.add_argument("--page-size", type=int, default=None,
                     help="tokens per KV page, a power of two (default: 16; 32 for KIVI)")
    srv.add_argument("--num-pages", type=int, default=None,
                     help="KV pages in the pool (default: enough for max-batch full contexts)")
    srv.add_argument("--prefill-chunk", type=int, default=64,
                     help="longest prefill call, in prompt tokens, a power of two (default: 64)")
    srv.add_argument("--prefill-budget", type=int, default=None,
                     help="prompt tokens prefilled per step, across requests (default: 4 chunks)")
    srv.add_argument("--max-context", type=int, default=None, metavar="TOKENS",
                     help="cap on prompt + completion tokens per request (default: the model's context); "
                          "smaller is cheaper per decode step")
    srv.add_argument("--dtype", choices=_DTYPES, default=None,
                     help="compute and parameter dtype (default: the checkpoint's)")
    srv.add_argument("--kv-dtype", choices=_KV_DTYPES, default=None,
                     help="KV cache dtype (default: the compute dtype)")
    srv.add_argument("--streaming-window", type=int, default=None, metavar="TOKENS",
                     help="StreamingLLM: keep only the sinks and this many recent tokens per request")
    srv.add_argument("--sinks", type=int, default=4, help="attention sinks kept under --streaming-window")
    srv.add_argument("--no-window-pages", action="store_true",
                     help="give sliding-window layers full-length pages instead of a ring of their window's, which "
                          "turns the prefix cache back on for models with window layers (Mistral, Gemma)")
    _kv_compression(srv)
    _speculative(srv)
    _compilation_cache(srv)
    srv.add_argument("--no-prefix-caching", action="store_true",
                     help="do not reuse the KV pages of shared prompt prefixes")
    srv.add_argument("--served-model-name", default=None, metavar="NAME",
                     help="model id clients send and /v1/models lists (default: the --model preset or the "
                          "checkpoint's name)")
    srv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    _serve_limits(srv.add_argument_group("security and per-request limits"))
    srv.set_defaults(func=_serve)

    conv = sub.add_parser("convert", help="convert an HF or GGUF checkpoint to a jaxkv checkpoint (--out), or any "
                                          "model to an HF checkpoint transformers loads (--to-hf)")
    src = conv.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", metavar="FILE", help="GGUF file (F32/F16/BF16/Q8_0/Q4_0/Q4_1)")
    src.add_argument("--hf", metavar="DIR", help="HF directory (config.json + safetensors) of a supported family")
    src.add_argument("--model", metavar="NAME", help="with --to-hf: a preset, jaxkv checkpoint dir or Hub id")
    dst = conv.add_mutually_exclusive_group(required=True)
    dst.add_argument("--out", metavar="DIR", help="write a jaxkv checkpoint")
    dst.add_argument("--to-hf", metavar="DIR", help="write HF safetensors + config + tokenizer (standard KV map)")
    conv.add_argument("--name", default=None, help="model name stored in the config")
    conv.add_argument("--dtype", choices=_DTYPES, default=None,
                      help="stored parameter dtype (default: float32)")
    conv.set_defaults(func=_convert)

    plan = sub.add_parser("plan", help="KV cache memory of a model, with and without KV sharing")
    plan.add_argument("--model", default="smollm2-135m",
                      help="preset, config file, checkpoint dir, HF dir, GGUF or Hub id org/name[@revision]")
    plan.add_argument("--kv-sharing", default=None, metavar="SPEC",
                      help='cla2, cla:3, lckv:2 (warmup layers), yoco, sandwich-middle:3 (one of the nine '
                           '<pizza|sandwich|lasagna>-<bottom|middle|top>:KV_LAYERS), or a map such as "0_0_2_2"')
    plan.add_argument("--context", type=int, default=4096)
    plan.add_argument("--batch", type=int, default=1)
    plan.add_argument("--kv-dtype", choices=_KV_DTYPES, default=None,
                      help="KV cache dtype (default: the model's compute dtype; quantized ones count their scales)")
    plan.add_argument("--memory", default=None, metavar="BYTES",
                      help="device memory, e.g. 24GiB: report the largest batch")
    plan.add_argument("--json", action="store_true")
    plan.add_argument("--plot", default=None, metavar="FILE.png",
                      help="also draw KV memory against context and the largest batch against device memory for the "
                           "baseline and the chosen --kv-sharing/--kv-dtype (any extension matplotlib writes)")
    plan.set_defaults(func=_plan)

    env = sub.add_parser("env", help="versions, devices, caches and the kernels jaxkv picks (for a bug report)")
    env.add_argument("--json", action="store_true")
    env.set_defaults(func=_env)

    tr = sub.add_parser("train", help="train or uptrain a model from a YAML train config (resumes automatically)")
    tr.add_argument("--config", required=True, metavar="FILE", help="train config (see configs/train/)")
    tr.add_argument("--steps", type=int, default=None, help="total optimizer steps (default: the config's)")
    tr.add_argument("--out", default=None, metavar="DIR", help="run directory (default: the config's out)")
    tr.add_argument("--mesh", default=None, metavar="SPEC", help=MESH_HELP)
    tr.set_defaults(func=_train)
    return parser


def _speculative(parser) -> None:
    parser.add_argument("--speculative", default=None, metavar="ngram:K|draft:MODEL:K",
                        help="speculative decoding: propose up to K tokens by prompt lookup (ngram) or with a draft "
                             "model sharing the tokenizer (a model as --model takes, or first-N: this model's first "
                             "N layers) and verify them in one step: the same output, fewer steps when proposals "
                             "are kept")


def _compilation_cache(parser) -> None:
    parser.add_argument("--no-compilation-cache", action="store_true",
                        help="compile every step shape afresh instead of loading what an earlier run kept in "
                             "$JAXKV_HOME/xla-cache (JAXKV_COMPILATION_CACHE=0 does the same)")


def _kv_compression(parser) -> None:
    """The KV compression flags generate, perplexity and serve share (beside --kv-dtype)."""
    parser.add_argument("--kv-rotate", action="store_true",
                        help="rotate keys and queries by a Hadamard matrix before the KV is stored (less quantization "
                             "error)")
    parser.add_argument("--eviction", choices=_EVICTIONS, default=None,
                        help="token eviction: keep --kv-budget tokens per sequence after its prompt, by H2O (the most "
                             "attended so far) or SnapKV (chosen once by the last prompt tokens)")
    parser.add_argument("--kv-budget", type=int, default=None, metavar="TOKENS",
                        help="tokens per sequence (and KV layer) that --eviction keeps")
    parser.add_argument("--eviction-window", type=int, default=None, metavar="TOKENS",
                        help="recent tokens always kept (SnapKV: its observation window; default: half the budget "
                             "for H2O, 32 for SnapKV)")
    parser.add_argument("--eviction-sinks", type=int, default=0, metavar="TOKENS",
                        help="first tokens of a sequence that --eviction always keeps (attention sinks; default 0)")
    parser.add_argument("--kv-recent", type=int, default=None, metavar="TOKENS",
                        help="KIVI (--kv-dtype kivi2|kivi4): the last tokens of a sequence kept in float, a multiple "
                             "of the page size (default: 128)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jaxkv.errors import JaxkvError
    from pallas_kernels.errors import KernelInputError

    try:
        if getattr(args, "mesh", None) is not None:
            from jaxkv.parallel.distributed import initialize_from_env

            initialize_from_env()  # one of several processes: JAX_COORDINATOR_ADDRESS etc. say so
        if getattr(args, "no_compilation_cache", False):  # jaxkv.load turns the cache on unless this says no
            os.environ["JAXKV_COMPILATION_CACHE"] = "0"
        args.func(args)
    except (JaxkvError, KernelInputError) as e:
        print(f"jaxkv: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jaxkv: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything else is our bug: still one line unless asked for more
        if os.environ.get("JAXKV_DEBUG"):
            raise
        first = (str(e).splitlines() or [""])[0]
        print(f"jaxkv: internal error: {type(e).__name__}: {first} (set JAXKV_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
