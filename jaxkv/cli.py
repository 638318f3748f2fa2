"""The `jaxkv` command line: a thin wrapper over the Python API. Errors print one line."""

from __future__ import annotations

import argparse
import json
import os
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _generate(args) -> None:
    import jaxkv

    llm = jaxkv.load(args.model, dtype=args.dtype)
    out = llm.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop, chat=args.chat)
    stats = llm.stats
    if args.json:
        print(json.dumps({
            "text": out.text, "token_ids": out.token_ids, "prompt_tokens": out.prompt_tokens,
            "tokens_per_s": round(stats.tokens_per_s, 3), "kv_bytes_per_token": llm.kv_bytes_per_token,
            "finish_reason": out.finish_reason,
        }))
    else:
        print(out.text)
        print(f"[{out.prompt_tokens} prompt tokens, {len(out.token_ids)} generated, {stats.tokens_per_s:.1f} tok/s "
              f"(compile {stats.compile_s:.1f}s), KV {llm.kv_bytes_per_token} B/token]", file=sys.stderr)


def _convert(args) -> None:
    from pathlib import Path

    from jaxkv.checkpoints.registry import open_source
    from jaxkv.checkpoints.store import convert

    out = convert(open_source(Path(args.gguf or args.hf).expanduser()), args.out, name=args.name, dtype=args.dtype)
    print(f"wrote {out}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxkv", description="JAX LLM inference where the KV cache is the limit.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("--model", default="smollm2-135m",
                     help="preset name, jaxkv checkpoint dir, HF dir or GGUF file (default: smollm2-135m)")
    gen.add_argument("--prompt", required=True, help="prompt text, used as is")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                     help="compute and parameter dtype (default: the checkpoint's)")
    gen.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    gen.set_defaults(func=_generate)

    conv = sub.add_parser("convert", help="convert an HF or GGUF checkpoint to a jaxkv checkpoint")
    src = conv.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", metavar="FILE", help="GGUF file (F32/F16/BF16/Q8_0/Q4_0/Q4_1)")
    src.add_argument("--hf", metavar="DIR", help="HF Llama-family directory (config.json + safetensors)")
    conv.add_argument("--out", required=True, metavar="DIR")
    conv.add_argument("--name", default=None, help="model name stored in the config")
    conv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                      help="stored parameter dtype (default: float32)")
    conv.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jaxkv.errors import JaxkvError

    try:
        args.func(args)
    except JaxkvError as e:
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
