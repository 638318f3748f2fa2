"""Write configs/kv_sharing/<geometry>/<map>.yaml: every KV-sharing map on a base geometry.

    python scripts/make_sharing_configs.py configs/models/tiny.yaml configs/models/smollm2-135m.yaml

Maps: standard, CLA2, LCKV (w=2), YOCO, and the nine partition x target configurations
with half the layers as KV layers. kv_sources is written in the underscore form that
published LCKV configs use; tests/test_kv_sharing.py checks the files against the
constructors, so they cannot drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from jaxkv.config import ModelConfig
from jaxkv.sharing import PARTITIONS, TARGETS, cla, lckv, standard, systematic, to_string, yoco

OUT = Path(__file__).resolve().parents[1] / "configs" / "kv_sharing"


def sharing_maps(n_layers: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """File stem -> (spec for jaxkv.sharing.parse_spec, kv_sources)."""
    maps = {"standard": ("standard", standard(n_layers)), "cla2": ("cla:2", cla(n_layers, 2)),
            "lckv2": ("lckv:2", lckv(n_layers, 2)), "yoco": ("yoco", yoco(n_layers))}
    half = n_layers // 2
    for partition in PARTITIONS:
        for target in TARGETS:
            spec = f"{partition}-{target}:{half}"
            maps[f"{partition}-{target}"] = (spec, systematic(n_layers, half, partition, target))
    return maps


def main(bases: list[str]) -> None:
    for base_file in bases:
        base = ModelConfig.load(base_file)
        folder = OUT / base.name
        folder.mkdir(parents=True, exist_ok=True)
        for stem, (spec, sources) in sharing_maps(base.n_layers).items():
            cfg = base.replace(kv_sources=sources, name=f"{base.name}-{stem}")
            data = cfg.to_dict()
            data["kv_sources"] = to_string(sources)
            header = (f"# {base.name} geometry with KV sharing {spec!r}: {cfg.n_kv_layers} of {cfg.n_layers} layers "
                      f"store KV.\n# Written by scripts/make_sharing_configs.py from {base_file}.\n")
            (folder / f"{stem}.yaml").write_text(header + yaml.safe_dump({"model": data}, sort_keys=False))
        print(f"wrote {len(sharing_maps(base.n_layers))} configs under {folder}")


if __name__ == "__main__":
    main(sys.argv[1:])
