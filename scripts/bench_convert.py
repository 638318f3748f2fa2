"""Peak memory of `jaxkv convert --hf` against loading the whole model first, same model, same run.

Writes a synthetic fp32 Llama as sharded HF safetensors (about 1.7 GB by default), then runs
in child processes (a) `jaxkv convert --hf` and (b) the naive peer: every tensor into RAM, then
one Orbax save of the whole tree. Reports each child's peak resident and peak anonymous memory
(RssAnon: what cannot be paged out; file-backed memmap pages can be) against the model's size.

    .venv/bin/python scripts/bench_convert.py [--layers 24] [--workdir /tmp/jaxkv-bench-convert]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

D, F, VOCAB, HEADS = 1024, 4096, 32000, 16

NAIVE_PEER = """
import sys, orbax.checkpoint as ocp
from jaxkv.checkpoints.hf import HFCheckpoint
from jaxkv.checkpoints.store import assemble_params
source = HFCheckpoint(sys.argv[1])
params = assemble_params(source.model_config(), source, "float32")  # all in RAM
checkpointer = ocp.StandardCheckpointer()
checkpointer.save(sys.argv[2], params)
checkpointer.wait_until_finished()
"""


def write_model(out: Path, layers: int) -> int:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    w = lambda *shape: rng.standard_normal(shape, dtype=np.float32) * 0.02  # noqa: E731
    ones = lambda: np.ones(D, np.float32)  # noqa: E731
    weight_map, total = {}, 0

    def shard(i, tensors):
        nonlocal total
        name = f"model-{i:05d}-of-{layers + 1:05d}.safetensors"
        save_file(tensors, str(out / name))
        weight_map.update({k: name for k in tensors})
        total += sum(t.nbytes for t in tensors.values())

    shard(0, {"model.embed_tokens.weight": w(VOCAB, D), "model.norm.weight": ones(), "lm_head.weight": w(VOCAB, D)})
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shard(layer + 1, {
            p + "input_layernorm.weight": ones(), p + "post_attention_layernorm.weight": ones(),
            **{p + f"self_attn.{n}_proj.weight": w(D, D) for n in "qkvo"},
            p + "mlp.gate_proj.weight": w(F, D), p + "mlp.up_proj.weight": w(F, D), p + "mlp.down_proj.weight": w(D, F)})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": D, "intermediate_size": F,
        "num_hidden_layers": layers, "num_attention_heads": HEADS, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048, "tie_word_embeddings": False}))
    _byte_tokenizer(out)
    return total


def _byte_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text("{}")


def peak_memory(cmd: list[str]) -> tuple[float, float, float]:
    """Run cmd; return (seconds, peak RSS GB, peak anonymous RSS GB) sampled from /proc."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks = {"VmHWM": 0, "RssAnon": 0}

    def sample():
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    key = line.split(":")[0]
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.02)

    start = time.perf_counter()
    watcher = threading.Thread(target=sample)
    watcher.start()
    _, err = proc.communicate()
    watcher.join()
    if proc.returncode:
        sys.exit(f"{cmd[:3]} failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    return time.perf_counter() - start, peaks["VmHWM"] / 1e6, peaks["RssAnon"] / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jaxkv-bench-convert"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    (args.workdir / "hf").mkdir(parents=True)
    size = write_model(args.workdir / "hf", args.layers) / 1e9
    jaxkv_cli = str(Path(sys.executable).parent / "jaxkv")
    ours = peak_memory([jaxkv_cli, "convert", "--hf", str(args.workdir / "hf"), "--out", str(args.workdir / "ours")])
    peer = peak_memory([sys.executable, "-c", NAIVE_PEER, str(args.workdir / "hf"), str(args.workdir / "peer")])
    print(f"\nSynthetic fp32 Llama, {args.layers} layers, {size:.2f} GB of weights\n")
    print("| method | time s | peak RSS GB | peak anonymous GB | anonymous / model size |")
    print("|---|---:|---:|---:|---:|")
    for name, (secs, rss, anon) in (("jaxkv convert (streamed)", ours), ("all in RAM + one Orbax save", peer)):
        print(f"| {name} | {secs:.1f} | {rss:.2f} | {anon:.2f} | {anon / size:.2f} |")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
