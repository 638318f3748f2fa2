"""Models named by Hugging Face Hub id ("org/name" or "org/name@revision").

huggingface_hub downloads them into its own cache (so HF_HOME, HF_TOKEN, HF_HUB_OFFLINE and HF_ENDPOINT work as
for transformers), and each (repo, commit) is converted once into $JAXKV_HOME/models/hub/ and reused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path

from jaxkv.checkpoints.store import convert, is_checkpoint
from jaxkv.errors import JaxkvError

# Hub's own rule: [\w.-] with a word character at each end, and no "--" or ".." (so "../x" stays a path).
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"({_PART}/{_PART})(?:@(\S+))?")
_INDEX = "model.safetensors.index.json"
# What jaxkv reads besides the weights, which are fetched second (see hub_snapshot).
_METADATA = ["config.json", "generation_config.json", _INDEX, "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja", "chat_template.json"]
_TRUE = ("1", "ON", "YES", "TRUE")


def parse_hub_id(name: str) -> tuple[str, str | None] | None:
    """(repo_id, revision or None) for "org/name[@revision]"; None for anything else."""
    match = _HUB_ID.fullmatch(name)
    if not match or "--" in match[1] or ".." in match[1]:
        return None
    return match[1], match[2]


def hub_options() -> dict:
    """HF_ENDPOINT, HF_HUB_OFFLINE and HF_HOME/HF_HUB_CACHE as they are now: huggingface_hub reads them once, into
    huggingface_hub.constants, when first imported (by transformers, say), and would ignore later changes."""
    env = os.environ
    home = env.get("HF_HOME")
    return {"endpoint": (env.get("HF_ENDPOINT") or "").rstrip("/") or None,
            "cache_dir": env.get("HF_HUB_CACHE") or (Path(home).expanduser() / "hub" if home else None),
            "local_files_only": env.get("HF_HUB_OFFLINE", "").upper() in _TRUE}


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """snapshot_download of the top-level files matching `patterns`; its errors become one-line JaxkvErrors."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    options = hub_options()
    endpoint = options["endpoint"] or constants.ENDPOINT
    where = f"{repo_id}@{revision}" if revision else repo_id
    try:  # subfolders hold other formats (onnx/, original/) that jaxkv does not read
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=["*/*"],
                                      **options))
    except GatedRepoError:
        raise JaxkvError(f"{repo_id} is gated or private: accept its terms at {endpoint}/{repo_id} "
                         f"and set HF_TOKEN to a token of an account with access") from None
    except RepositoryNotFoundError:
        raise JaxkvError(f"unknown model {repo_id!r}: no such local path, and {endpoint} has no such repository "
                         f"(check the spelling, or set HF_TOKEN if it is private)") from None
    except RevisionNotFoundError:
        raise JaxkvError(f"{repo_id} has no revision {revision!r} (a branch, tag or commit) on {endpoint}") from None
    except LocalEntryNotFoundError:
        offline = options["local_files_only"] or constants.HF_HUB_OFFLINE
        raise JaxkvError(f"{where} is not in the local Hugging Face cache and "
                         + (f"HF_HUB_OFFLINE is set, so {endpoint} (HF_ENDPOINT) was not asked" if offline else
                            f"{endpoint} (HF_ENDPOINT) cannot be reached (HF_HUB_OFFLINE=1 uses only the cache)")
                         ) from None
    except HfHubHTTPError as e:
        reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise JaxkvError(f"cannot download {where} from {endpoint}: {reason}") from None


def hub_snapshot(repo_id: str, revision: str | None = None, weights: bool = True) -> Path:
    """The local snapshot of a Hub model (a folder named by its commit hash) with the files jaxkv reads: config,
    tokenizer and weight index, then with `weights` the safetensors."""
    snapshot = _download(repo_id, revision, _METADATA)
    if not (snapshot / "config.json").is_file():
        raise JaxkvError(f"{repo_id} has no config.json: not a transformers model repository")
    return _add_weights(repo_id, snapshot) if weights else snapshot


def _add_weights(repo_id: str, snapshot: Path) -> Path:
    """Download the weights into `snapshot`: only the shards the index names (else every top-level *.safetensors),
    as repos such as Mistral's also carry the same weights as consolidated.safetensors."""
    shards = ["*.safetensors"]
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):  # HFCheckpoint reports it
        shards = sorted(set(json.loads((snapshot / _INDEX).read_text())["weight_map"].values()))
    _download(repo_id, snapshot.name, shards)  # by commit hash: the revision is not looked up again
    if not any(snapshot.glob("*.safetensors")):
        raise JaxkvError(f"{repo_id} has no *.safetensors weights "
                         f"(jaxkv reads safetensors; pytorch_model.bin is not supported)")
    return snapshot


def hub_checkpoint(name: str) -> Path:
    """The jaxkv checkpoint of a Hub id, converted on first use of its commit. Later calls only resolve the
    revision to a commit (offline: from the cache) and download no weights."""
    from jaxkv.checkpoints.registry import file_lock, jaxkv_home, open_source  # registry imports this module

    parsed = parse_hub_id(name)
    if parsed is None:
        raise JaxkvError(f"{name!r} is not a Hugging Face Hub id (org/name or org/name@revision)")
    repo_id, revision = parsed
    snapshot = hub_snapshot(repo_id, revision, weights=False)
    folder, commit = repo_id.replace("/", "--"), snapshot.name
    out = jaxkv_home() / "models" / "hub" / folder / commit
    with file_lock(jaxkv_home() / "locks" / f"hub--{folder}.lock"):
        if not is_checkpoint(out):
            _add_weights(repo_id, snapshot)
            print(f"jaxkv: converting {repo_id}@{commit[:12]} into {out} (once)", file=sys.stderr)
            convert(open_source(snapshot), out, name=repo_id)
    return out
