"""The train config: a YAML file of sections (model, tokenizer, data, train, checkpoint, out).

Every key is checked when the file is read, so a typo or a bad value fails in one line
before any data is fetched or anything compiles.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from jaxkv.config import DTYPES, UPWARD_SCHEDULES
from jaxkv.data.corpus import SHAKESPEARE
from jaxkv.errors import JaxkvError


def _check_types(obj, section: str) -> None:
    """Give each field its declared type or fail naming `section.field`. YAML 1.1 reads `3e-3`
    as a string, so floats are parsed here."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        kind = str(field.type)
        where = f"{section}.{field.name}"
        if kind == "float" and not isinstance(value, bool):
            try:
                object.__setattr__(obj, field.name, float(value))
            except (TypeError, ValueError):
                raise JaxkvError(f"{where} must be a number, got {value!r}") from None
        elif kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise JaxkvError(f"{where} must be an integer, got {value!r}")
        elif kind == "bool" and not isinstance(value, bool):
            raise JaxkvError(f"{where} must be true or false, got {value!r}")
        elif kind in ("str", "str | None") and not (isinstance(value, str) or (value is None and kind != "str")):
            raise JaxkvError(f"{where} must be a string, got {value!r}")


def _strings(value, where: str) -> tuple[str, ...] | None:
    """None, or a list of strings (one string is a list of one) as a tuple."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise JaxkvError(f"{where} must be a string or a list of strings, got {value!r}")
    return tuple(items)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Exactly one of `config` (geometry of a model trained from scratch: a model config file or
    preset) and `init_from` (a preset or checkpoint whose weights training starts from)."""

    config: str | None = None
    init_from: str | None = None
    kv_sharing: str | None = None  # a jaxkv.sharing.parse_spec spec, e.g. cla2, lckv:2
    upward_passes: tuple[int, int] | None = None  # LCKV: passes without gradient, passes with it
    upward_schedule: str | None = None  # LCKV: "per_group" (the authors' plan, default) or "joint"

    def __post_init__(self):
        _check_types(self, "model")
        if (self.config is None) == (self.init_from is None):
            raise JaxkvError("model needs exactly one of config (train from scratch) and init_from (start from weights)")
        if self.upward_passes is not None:
            passes = self.upward_passes
            if (not isinstance(passes, (list, tuple)) or len(passes) != 2
                    or not all(isinstance(p, int) and not isinstance(p, bool) for p in passes)):
                raise JaxkvError(f"model.upward_passes must be two integers [no_grad, grad], got {passes!r}")
            object.__setattr__(self, "upward_passes", tuple(passes))
        if self.upward_schedule not in (None, *UPWARD_SCHEDULES):
            raise JaxkvError(f"model.upward_schedule must be one of {', '.join(UPWARD_SCHEDULES)}, "
                             f"got {self.upward_schedule!r}")


@dataclasses.dataclass(frozen=True)
class TokenizerSection:
    """`tokenizer: NAME` (a preset or checkpoint whose tokenizer to use) or `{train_bpe: VOCAB}`.
    Neither: the init_from model's own tokenizer."""

    name: str | None = None
    train_bpe: int = 0

    @classmethod
    def parse(cls, value) -> TokenizerSection:
        if value is None or isinstance(value, str):
            return cls(name=value)
        if isinstance(value, dict) and set(value) == {"train_bpe"}:
            section = cls(train_bpe=value["train_bpe"])
            if section.train_bpe < 1:
                raise JaxkvError(f"tokenizer.train_bpe must be a positive vocabulary size, got {section.train_bpe}")
            return section
        raise JaxkvError(f"tokenizer must be a preset or checkpoint name, or {{train_bpe: VOCAB_SIZE}}; got {value!r}")

    def __post_init__(self):
        _check_types(self, "tokenizer")


@dataclasses.dataclass(frozen=True)
class DataSection:
    source: str | tuple[str, ...] = SHAKESPEARE  # "shakespeare", or .txt/.jsonl paths and globs
    seq_len: int = 128
    validation: tuple[str, ...] | None = None  # held-out Shakespeare works or local files
    validation_fraction: float = 0.0  # or: hold out this tail fraction of local documents
    jsonl_field: str = "text"

    def __post_init__(self):
        object.__setattr__(self, "source", self.source if self.source == SHAKESPEARE
                           else _strings(self.source, "data.source"))
        object.__setattr__(self, "validation", _strings(self.validation, "data.validation"))
        _check_types(self, "data")
        if self.seq_len < 1:
            raise JaxkvError(f"data.seq_len must be positive, got {self.seq_len}")
        if not 0 <= self.validation_fraction < 1:
            raise JaxkvError(f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.validation and self.validation_fraction:
            raise JaxkvError("data.validation and data.validation_fraction are alternatives: give one")


@dataclasses.dataclass(frozen=True)
class TrainSection:
    steps: int = 300
    batch_size: int = 16  # sequences per optimizer step, split into grad_accum microbatches
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # global gradient norm; 0 turns clipping off
    b1: float = 0.9
    b2: float = 0.95
    seed: int = 0
    compute_dtype: str = "float32"
    remat: bool = False
    eval_every: int = 50  # 0: only at the end
    eval_batches: int = 8
    log_every: int = 10
    mesh: str | None = None  # e.g. "fsdp=4,model=2" (jaxkv.parallel.make_mesh); None: one device

    def __post_init__(self):
        _check_types(self, "train")
        for name in ("steps", "batch_size", "grad_accum", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise JaxkvError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "weight_decay", "clip_norm"):
            if getattr(self, name) < 0:
                raise JaxkvError(f"train.{name} must not be negative, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise JaxkvError(f"train.batch_size ({self.batch_size}) must be a multiple of "
                             f"train.grad_accum ({self.grad_accum})")
        if self.lr <= 0:
            raise JaxkvError(f"train.lr must be positive, got {self.lr}")
        for name in ("min_lr_ratio", "b1", "b2"):
            if not 0 <= getattr(self, name) <= 1:
                raise JaxkvError(f"train.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.compute_dtype not in DTYPES:
            raise JaxkvError(f"train.compute_dtype must be one of {', '.join(DTYPES)}, got {self.compute_dtype!r}")

    @property
    def microbatch(self) -> int:
        return self.batch_size // self.grad_accum


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 100
    keep: int = 3

    def __post_init__(self):
        _check_types(self, "checkpoint")
        for name in ("every", "keep"):
            if getattr(self, name) < 1:
                raise JaxkvError(f"checkpoint.{name} must be positive, got {getattr(self, name)}")


_SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection, "checkpoint": CheckpointSection}


def _section(cls, value, name: str):
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise JaxkvError(f"{name} must be a mapping, got {value!r}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise JaxkvError(f"unknown key {name}.{unknown[0]} (known: {', '.join(known)})")
    return cls(**value)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSection
    out: str  # the run directory: metrics.jsonl, checkpoints/, final/
    tokenizer: TokenizerSection = TokenizerSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    checkpoint: CheckpointSection = CheckpointSection()

    def __post_init__(self):
        if self.model.config is not None and self.tokenizer.name is None and not self.tokenizer.train_bpe:
            raise JaxkvError("a model trained from scratch needs a tokenizer: a preset or checkpoint name, "
                             "or {train_bpe: VOCAB_SIZE}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        if not isinstance(data, dict):
            raise JaxkvError("a train config must be a mapping of sections")
        known = ["model", "tokenizer", "data", "train", "checkpoint", "out"]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise JaxkvError(f"unknown train config section {unknown[0]!r} (known: {', '.join(known)})")
        for required in ("model", "out"):
            if data.get(required) is None:
                raise JaxkvError(f"the train config needs a {required} section")
        if not isinstance(data["out"], str):
            raise JaxkvError(f"out must be a directory path, got {data['out']!r}")
        sections = {name: _section(kind, data.get(name), name) for name, kind in _SECTIONS.items()}
        return cls(out=data["out"], tokenizer=TokenizerSection.parse(data.get("tokenizer")), **sections)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise JaxkvError(f"cannot read train config {path}: {str(e).splitlines()[0]}") from None
        return cls.from_dict(data)

    def with_overrides(self, steps: int | None = None, out: str | None = None, mesh: str | None = None) -> TrainConfig:
        """This config with the command line's overrides."""
        given = {name: value for name, value in (("steps", steps), ("mesh", mesh)) if value is not None}
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **given),
                                   out=self.out if out is None else str(out))
