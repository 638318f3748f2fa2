"""Reference outputs from the LCKV authors' own PyTorch code, to cross-check jaxkv's lckv-llama import/export.

The authors' code (github.com/whyNLP/LCKV, package `models/`: LCKVLlamaConfig, LCKVLlamaForCausalLM, registered as
model_type "lckv-llama" on `import models`) needs transformers 4.45; jaxkv's .venv has transformers 5. This script
runs in a side environment that reuses .venv's torch and numpy and puts transformers 4.45.2 in front of them:

    git --git-dir=/work/.mirror/whyNLP+LCKV/repo archive HEAD | (mkdir -p /tmp/lckv-src && tar -x -C /tmp/lckv-src)
    .venv/bin/python -m pip install --target /tmp/tf445 --no-deps \\
        "transformers==4.45.2" "tokenizers==0.20.3" "huggingface_hub==0.26.5"
    export PYTHONPATH=/tmp/tf445          # .venv already has safetensors, regex, pyyaml, requests, tqdm, filelock

(torch 2.13 CPU, numpy 2.4, Python 3.11.) Their `models/utils.py` declares `layer_slice: slice = slice(None)` in a
dataclass, which Python 3.11 rejects (slice became hashable only in 3.12; 3.10 did not check); this script works
around it while importing `models` (the field default stays slice(None)), without editing their files.

Write a tiny random model with THEIR config class and save_pretrained (the exact format their code writes):

    PYTHONPATH=/tmp/tf445 .venv/bin/python scripts/lckv_authors_check.py --lckv-src /tmp/lckv-src \\
        --write-random /tmp/lckv_a --layer-types 0_2s_2_3_5_5_6 --forward-passes 2 --backward-passes 1 \\
        --sliding-window 4 --seed 0 [--init-std 0.2]

Reference outputs of a model directory in their format (no tokenizer needed: ids are given):

    PYTHONPATH=/tmp/tf445 .venv/bin/python scripts/lckv_authors_check.py --lckv-src /tmp/lckv-src \\
        --model /tmp/lckv_a --ids 3,17,99,5,42,7,8,250,1,2,3,4,5,6 --generate 8 --out /tmp/lckv_a.npz

The npz holds
  ids                 int64 [T]
  logits              float32 [T, V]: one forward of their model over ids, called as generate's prefill calls it
                      (past_key_values=DynamicCache(), use_cache=True). With T > forward_passes + backward_passes this
                      is their iteration plan; with T <= m + b (and some layer reading a layer above) their forward
                      switches to the token-by-token `_modeling_sequential`, which the script prints.
  logits_plain        float32 [T, V]: `model(ids)` with no cache object. Identical to `logits` on the plan path; on
                      the token-by-token path it differs, since there every layer then sees only the current token's
                      KV (their LayerCache keeps no history unless a transformers Cache is passed).
  generated           int64 [<=N]: model.generate(ids, do_sample=False, max_new_tokens=N) (stops early at eos unless
                      --ignore-eos), with
  generated_logits    float32 [n, V]: the logits generate chose each token from.
  meta                a JSON string: mode (plan/sequential), the iteration plan, config, versions.

Compare with jaxkv, in jaxkv's own environment (.venv, no PYTHONPATH); the model directory needs tokenizer files
for jaxkv.load (any will do: the ids are given):

    .venv/bin/python scripts/lckv_authors_check.py --lckv-src /tmp/lckv-src --model /tmp/lckv_a \
        --compare /tmp/lckv_a.npz

What their code computes, found by reading and running it (docs/results/lckv_authors.md has the measured figures):
  * The prompt path (T > m + b) is their iteration plan: a layer that reads a layer above it starts a group reaching
    the highest layer any member reads; the group runs m + b - 1 passes whose hidden states are discarded (only the
    KV they store survives) and one more whose output goes on, every pass from the group's input; the KV read from
    above starts at zeros. Other layers run once. So inference depends on m + b only.
  * A layer reading from above masks its diagonal (a window layer there sees w - 1 keys, others w). Position 0 of
    such a layer sees no key: their flash and SDPA paths give it zeros (the paper's and jaxkv's semantics), their
    eager path a uniform average over all T keys (future ones included), so eager is not causal there: compare
    with --attn sdpa (the default).
  * Token by token (decode, or prompts of T <= m + b) an upward-reading layer gets a zero key/value prepended and
    its last column masked, so it sees tokens 0..t-2, not t-1 as the plan does (the jaxkv guide's "facts learned
    the hard way"); their SDPA decode also anchors its mask at the wrong corner. Only prompt-path logits are
    compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch


# ----------------------------------------------------------------------------------------------------------------
# Their package


def import_lckv(src: str):
    """`import models` from the authors' checkout (registers lckv-llama with the Auto classes)."""
    sys.path.insert(0, str(Path(src).resolve()))
    if sys.version_info[:2] != (3, 11):
        import models
        return models
    # Python 3.11 refuses unhashable dataclass defaults; `IterStep.layer_slice = slice(None)` is one (3.12 made
    # slice hashable). Let dataclasses see None while it checks, then put the slice back as the field default.
    original = dataclasses._get_field

    def get_field(cls, name, *args, **kwargs):
        default = cls.__dict__.get(name, dataclasses.MISSING)
        if not isinstance(default, slice):
            return original(cls, name, *args, **kwargs)
        setattr(cls, name, None)
        try:
            f = original(cls, name, *args, **kwargs)
        finally:
            setattr(cls, name, default)
        f.default = default
        return f

    dataclasses._get_field = get_field
    try:
        import models
    finally:
        dataclasses._get_field = original
    return models


def write_random(args) -> None:
    models = import_lckv(args.lckv_src)
    from models.modeling_lckv import LCKVLlamaForCausalLM

    n = len(args.layer_types.split("_"))
    extra = {}
    if args.forward_passes is not None:
        extra["forward_passes"] = args.forward_passes
    if args.backward_passes is not None:
        extra["backward_passes"] = args.backward_passes
    if args.sliding_window is not None:
        extra["sliding_window"] = args.sliding_window
    config = models.LCKVLlamaConfig(
        layer_types=args.layer_types, vocab_size=260, hidden_size=64, intermediate_size=160, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=256, eos_token_id=257, initializer_range=args.init_std, **extra)
    torch.manual_seed(args.seed)
    model = LCKVLlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(args.write_random, safe_serialization=True)
    print(f"wrote {args.write_random}: layer_types={config.layer_types} forward_passes={config.forward_passes} "
          f"backward_passes={config.backward_passes} sliding_window={config.sliding_window} seed={args.seed}")


def load(model_dir: str, attn: str):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, torch_dtype=torch.float32, attn_implementation=attn, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        print(f"WARNING loading {model_dir}: {bad}")
    return model.eval()


def reference(args) -> None:
    import_lckv(args.lckv_src)
    import transformers
    from models.utils import LayerTypeParser
    from transformers import DynamicCache

    model = load(args.model, args.attn)
    cfg = model.config
    if cfg.model_type != "lckv-llama":
        print(f"WARNING: model_type is {cfg.model_type!r}, not 'lckv-llama'")
    ids = torch.tensor([[int(t) for t in args.ids.split(",")]], dtype=torch.long)
    T = ids.shape[1]
    parser = LayerTypeParser(cfg.layer_types)
    sequential = bool(cfg.use_sequential or (T <= cfg.forward_passes + cfg.backward_passes and parser.attends_top()))
    mode = "sequential" if sequential else "plan"
    plan = [(s.layer_slice.start, s.layer_slice.stop, s.update)
            for s in parser.iteration_plan(cfg.forward_passes, cfg.backward_passes)]
    print(f"layer_types={cfg.layer_types} m={cfg.forward_passes} b={cfg.backward_passes} "
          f"sliding_window={cfg.sliding_window} T={T}")
    if sequential:
        print(f"NOTE: T={T} <= forward_passes+backward_passes={cfg.forward_passes + cfg.backward_passes} "
              f"(or use_sequential): their forward runs token by token (_modeling_sequential), not the plan")
    else:
        print(f"their iteration plan (start, stop, update): {plan}")

    with torch.no_grad():
        logits = model(ids, past_key_values=DynamicCache(), use_cache=True).logits[0].float()
        plain = model(ids).logits[0].float()
    print(f"logits {tuple(logits.shape)} finite={bool(torch.isfinite(logits).all())}; "
          f"max|logits - logits_plain| = {(logits - plain).abs().max().item():.3g}")
    out = dict(ids=ids[0].numpy(), logits=logits.numpy(), logits_plain=plain.numpy())

    meta = dict(attn=args.attn, mode=mode, plan=plan, T=T, layer_types=cfg.layer_types,
                forward_passes=cfg.forward_passes,
                backward_passes=cfg.backward_passes, sliding_window=cfg.sliding_window,
                use_sequential=cfg.use_sequential, force_nodiag=cfg.force_nodiag,
                transformers=transformers.__version__, torch=torch.__version__, python=sys.version.split()[0])
    if args.generate:
        eos = None if args.ignore_eos else model.generation_config.eos_token_id
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (
            (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0)
        with torch.no_grad():
            g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=args.generate, eos_token_id=eos, pad_token_id=pad,
                               output_logits=True, return_dict_in_generate=True)
        generated = g.sequences[0, T:]
        out["generated"] = generated.numpy()
        out["generated_logits"] = torch.stack(g.logits, 1)[0].float().numpy()
        meta.update(generate=args.generate, eos_token_id=eos, stopped_early=len(generated) < args.generate)
        print(f"generated ({len(generated)} of {args.generate}): {generated.tolist()}; "
              f"max|generated_logits[0] - logits[-1]| = "
              f"{(torch.stack(g.logits, 1)[0, 0] - logits[-1]).abs().max().item():.3g}")

    out["meta"] = np.array(json.dumps(meta))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **out)
    print(f"saved {args.out}: {sorted(out)}")


def compare(args) -> None:
    """In jaxkv's own environment: jaxkv's logits of the same ids on the same directory, against the npz."""
    import jaxkv
    from jaxkv.cache.dense import KVCache
    from jaxkv.model.decoder import forward

    theirs = np.load(args.compare)
    llm = jaxkv.load(args.model)
    ids = theirs["ids"][None]
    ours = np.asarray(forward(llm.config, llm.params, ids, KVCache.init(llm.config, 1, ids.shape[1]))[0][0])
    err = np.linalg.norm(ours - theirs["logits"]) / np.linalg.norm(theirs["logits"])
    print(f"jaxkv vs their {json.loads(str(theirs['meta']))['attn']} forward, {ids.shape[1]} tokens, "
          f"{llm.config.kv_sources} (window {llm.config.window_layers}): relative error {err:.2e}, "
          f"argmax agreement {np.mean(ours.argmax(-1) == theirs['logits'].argmax(-1)):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lckv-src", required=True, help="checkout of github.com/whyNLP/LCKV (holds models/)")
    ap.add_argument("--model", help="model directory in their format")
    ap.add_argument("--ids", help="comma-separated prompt token ids")
    ap.add_argument("--generate", type=int, default=0, help="greedy new tokens to generate")
    ap.add_argument("--ignore-eos", action="store_true", help="generate exactly N tokens (eos_token_id=None)")
    ap.add_argument("--out", help="output .npz")
    ap.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa",
                    help="their attention class: sdpa's prompt pass gives a fully masked row zeros, as their flash "
                         "path (and the paper) does; eager averages every value there")
    ap.add_argument("--compare", metavar="NPZ", help="(jaxkv's environment) jaxkv's logits on --model against NPZ")
    ap.add_argument("--write-random", metavar="DIR", help="write a tiny random model with their config and exit")
    ap.add_argument("--layer-types", default="0_2_2_3_5_5_6")
    ap.add_argument("--forward-passes", type=int)
    ap.add_argument("--backward-passes", type=int)
    ap.add_argument("--sliding-window", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-std", type=float, default=0.02,
                    help="initializer_range (their default 0.02 gives near-uniform attention; 0.2 is sharper)")
    args = ap.parse_args()
    if args.write_random:
        write_random(args)
    elif args.compare and args.model:
        compare(args)
    elif args.model and args.ids and args.out:
        reference(args)
    else:
        ap.error("give --write-random DIR, or --model, --ids and --out")


if __name__ == "__main__":
    main()
