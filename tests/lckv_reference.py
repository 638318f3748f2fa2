"""The LCKV authors' LCKVLlamaForCausalLM forward, written literally in PyTorch from their code
(github.com/whyNLP/LCKV: models/modeling_lckv.py, models/utils.py, models/cache_utils.py), independently of
jaxkv's decoder, to check jaxkv's import and export of their checkpoint format.

What it reproduces: `LayerTypeParser.iteration_plan` (each group of layers tied by upward reads iterated on its
own: forward_passes steps without gradient, backward_passes - 1 more, then the one that updates the hidden
state; layers outside groups once); `LayerCache.initialize` (the KV of every upward source starts at zeros);
each step re-running its layers from the group's input and overwriting the KV of the layers it computes
(`layer_set`); the diagonal masked for a layer whose source is above it; `s` layers attending to the last
`sliding_window` positions; RMSNorm, RoPE (default, rotate-half), GQA and SwiGLU as transformers' Llama. A query
that sees no key outputs zeros, as their flash and SDPA paths do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def iteration_plan(sources: list[int], forward_passes: int, backward_passes: int) -> list[tuple[slice, bool]]:
    """(layer slice, updates the hidden state) per step, as `LayerTypeParser.iteration_plan` builds it."""
    if not any(src > i for i, src in enumerate(sources)):
        return [(slice(0, len(sources)), True)]
    plan, i = [], 0
    while i < len(sources):
        if sources[i] > i:
            top = sources[i]
            while top < max(sources[i: top + 1]):
                top = max(sources[i: top + 1])
            group = slice(i, top + 1)
            plan += [(group, False)] * (forward_passes + backward_passes - 1) + [(group, True)]
            i = top + 1
        else:
            top = i + 1
            while top < len(sources) and not sources[top] > top:
                top += 1
            plan.append((slice(i, top), True))
            i = top
    return plan


class LCKVLlama:
    """An LCKVLlamaForCausalLM directory (config.json + model.safetensors) in float32."""

    def __init__(self, directory: Path):
        self.c = json.loads((Path(directory) / "config.json").read_text())
        assert self.c["architectures"] == ["LCKVLlamaForCausalLM"] and self.c["model_type"] == "lckv-llama"
        self.w = {k: v.float() for k, v in load_file(str(Path(directory) / "model.safetensors")).items()}
        parts = self.c["layer_types"].split("_")
        self.sources = [int(p.rstrip("s")) for p in parts]
        self.windowed = [p.endswith("s") for p in parts]
        self.heads, self.kv_heads = self.c["num_attention_heads"], self.c["num_key_value_heads"]
        self.head_dim = self.c.get("head_dim") or self.c["hidden_size"] // self.heads

    def _norm(self, x, name):
        eps = self.c["rms_norm_eps"]
        return self.w[name] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def _linear(self, x, name):
        out = x @ self.w[f"{name}.weight"].T
        return out + self.w[f"{name}.bias"] if f"{name}.bias" in self.w else out

    def _rope(self, x, positions):
        half = self.head_dim // 2
        inv_freq = 1.0 / (self.c.get("rope_theta", 10000.0) ** (torch.arange(0, half * 2, 2).float() / (half * 2)))
        angles = positions[:, None].float() * inv_freq[None]
        cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def _layer(self, i: int, x, cache: dict):
        p = f"model.layers.{i}."
        h = self._norm(x, p + "input_layernorm.weight")
        T = x.shape[0]
        positions = torch.arange(T)
        q = self._rope(self._linear(h, p + "self_attn.q_proj").view(T, self.heads, self.head_dim), positions)
        if i in self.sources:  # computes_kv: layer_set overwrites this layer's KV
            k = self._rope(self._linear(h, p + "self_attn.k_proj").view(T, self.kv_heads, self.head_dim), positions)
            v = self._linear(h, p + "self_attn.v_proj").view(T, self.kv_heads, self.head_dim)
            cache[i] = (k, v)
        k, v = cache[self.sources[i]]
        k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))
        scores = torch.einsum("thd,shd->hts", q, k) / self.head_dim ** 0.5
        query, key = positions[:, None], positions[None, :]
        visible = key < query if self.sources[i] > i else key <= query
        if self.windowed[i]:
            visible &= key > query - self.c["sliding_window"]
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
        attn = torch.einsum("hts,shd->thd", probs, v).reshape(T, -1)
        x = x + self._linear(attn, p + "self_attn.o_proj")
        h = self._norm(x, p + "post_attention_layernorm.weight")
        gate, up = self._linear(h, p + "mlp.gate_proj"), self._linear(h, p + "mlp.up_proj")
        return x + self._linear(torch.nn.functional.silu(gate) * up, p + "mlp.down_proj")

    @torch.no_grad()
    def logits(self, ids: list[int], passes: int | None = None) -> torch.Tensor:
        """Float32 logits [T, V] of the prompt path; `passes` overrides forward_passes + backward_passes."""
        m, b = self.c.get("forward_passes", 7), self.c.get("backward_passes", 2)
        if passes is not None:
            m, b = passes - 1, 1
        T = len(ids)
        zeros = torch.zeros(T, self.kv_heads, self.head_dim)
        cache = {src: (zeros, zeros) for i, src in enumerate(self.sources) if src > i}
        hidden = self.w["model.embed_tokens.weight"][torch.tensor(ids)]
        for layers, update in iteration_plan(self.sources, m, b):
            out = hidden
            for i in range(layers.start, layers.stop):
                out = self._layer(i, out, cache)
            if update:
                hidden = out
        head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        return self._norm(hidden, "model.norm.weight") @ head.T
