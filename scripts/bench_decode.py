"""Greedy decode throughput of SmolLM2-135M: jaxkv against HF transformers, same weights, same run.

Both run the same dequantized weights of the default model's GGUF. jaxkv loads its converted
checkpoint; HF loads a dense safetensors export of the same tensors, the usual HF path (its
own GGUF loader keeps weights packed and dequantizes inside its kernels, a different thing).
Both get the same prompts (equal token lengths, so HF needs no padding; random ids, new for every
run, so jaxkv's prefix cache never serves one) and generate exactly N tokens with EOS ignored. Each
configuration is warmed up once (jaxkv compiles there), then timed `--repeats` times end to end
(prefill + decode); the table reports medians and ratios.

    .venv/bin/python scripts/bench_decode.py --batches 1 16 64 --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def prompts(vocab_size: int, batch: int, length: int, run: int) -> list[list[int]]:
    """Fresh random prompts for every run (warm-up included), so no run finds an earlier one's pages in the
    engine's prefix cache: each side computes every prompt, as HF does."""
    rng = np.random.default_rng(run)
    return rng.integers(100, vocab_size, (batch, length)).tolist()


def export_dense_hf() -> str:
    """The default model's dequantized weights as an HF safetensors directory (written once)."""
    from safetensors.numpy import save_file
    from transformers import LlamaConfig

    from jaxkv.checkpoints.registry import jaxkv_home, open_source, preset_source_file

    out = jaxkv_home() / "bench" / "smollm2-135m-hf-dense"
    if not (out / "model.safetensors").exists():
        source = open_source(preset_source_file("smollm2-135m"))
        cfg = source.model_config()
        out.mkdir(parents=True, exist_ok=True)
        save_file(dict(source.tensors()), str(out / "model.safetensors"))
        LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
                    num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                    num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                    max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
                    rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}).save_pretrained(out)
    return str(out)


def time_runs(fn, repeats: int) -> float:
    """Median time of fn(run) for runs 1..repeats, after fn(0) as warm-up (jaxkv compiles there)."""
    fn(0)
    times = []
    for run in range(1, repeats + 1):
        start = time.perf_counter()
        fn(run)
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
    from jaxkv.generate.sampling import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    hf_dir = export_dense_hf()
    rows = []
    for dtype in args.dtypes:
        llm = jaxkv.load("smollm2-135m", dtype=dtype)
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype).eval()
        for batch in args.batches:
            def ids(run, batch=batch):
                return prompts(llm.config.vocab_size, batch, args.prompt_len, run)

            ours = time_runs(lambda run: llm.generate_ids(ids(run), args.new_tokens, SamplingParams(),
                                                          ignore_eos=True), args.repeats)  # exactly N, like HF

            def hf_generate(run):
                inputs = torch.tensor(ids(run))
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
