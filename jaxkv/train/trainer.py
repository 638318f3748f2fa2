"""`train(config)`: AdamW on packed text, resumable exactly, ending in a jaxkv checkpoint.

A run directory holds metrics.jsonl (one JSON line per log step and per evaluation),
checkpoints/ (Orbax: params, optimizer state, step and the data key), tokenizer/ (when
trained here) and final/ (a jaxkv checkpoint for `jaxkv generate`). Running the same
config again resumes from the latest checkpoint. The batch of step s is a pure function
of s and the data key, and the restored state is bit-exact. So a resumed run repeats
the losses of an uninterrupted one.

Parameters and optimizer state are float32. The forward pass runs in `compute_dtype`:
the model's layers cast float32 parameters on use. The loss is float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from jaxkv.cache.dense import kv_bytes_per_token
from jaxkv.checkpoints.registry import open_source, resolve, resolve_config
from jaxkv.checkpoints.store import save_checkpoint
from jaxkv.config import ModelConfig
from jaxkv.data.corpus import Split, load_split
from jaxkv.data.tokens import Batches, eval_batches, packed_rows, train_bpe
from jaxkv.errors import JaxkvError
from jaxkv.model.decoder import init_params, param_shardings, sequence_logits
from jaxkv.model.uptrain import share_kv
from jaxkv.parallel.mesh import make_mesh
from jaxkv.parallel.rules import constrain, opt_state_shardings, put
from jaxkv.sharing import with_sharing
from jaxkv.tokenizer import Tokenizer
from jaxkv.train.config import TrainConfig, TrainSection

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
FINAL_DIR = "final"


@dataclasses.dataclass
class TrainResult:
    """A finished run, read back from its metrics.jsonl (so a resumed run reports all its steps)."""

    out: Path
    final: Path  # the jaxkv checkpoint
    steps: int
    parameters: int
    kv_bytes_per_token: int
    loss: float  # the last logged training loss
    val_loss: float  # at the last step
    val_ppl: float
    evals: list[dict]  # every evaluation: step, val_loss, val_ppl
    step_time_s: float  # median over logged windows, compilation excluded
    tokens_per_s: float  # median over logged windows
    compile_s: float  # of this invocation's train step


# --- model and tokenizer ---------------------------------------------------------------------
def _named_tokenizer(name: str) -> Tokenizer:
    kind, path = resolve(name)
    return Tokenizer.load(path) if kind == "checkpoint" else open_source(path).tokenizer()


def _tokenizer(cfg: TrainConfig, split: Split, run_dir: Path) -> Tokenizer | None:
    """The configured tokenizer; a BPE is trained on the training documents once per run
    directory and kept there, so a resumed run tokenizes the same way. None: the model's own."""
    if cfg.tokenizer.train_bpe:
        saved = run_dir / TOKENIZER_DIR
        if (saved / "tokenizer.json").is_file():
            return Tokenizer.load(saved)
        tokenizer = train_bpe((doc.text for doc in split.train), cfg.tokenizer.train_bpe)
        tokenizer.save(saved)
        return tokenizer
    return None if cfg.tokenizer.name is None else _named_tokenizer(cfg.tokenizer.name)


def _model(cfg: TrainConfig, split: Split, run_dir: Path, init_key: jax.Array) -> tuple[ModelConfig, dict, Tokenizer]:
    """Config (float32), float32 parameters and tokenizer of the model to train."""
    section = cfg.model
    tokenizer = _tokenizer(cfg, split, run_dir)
    if section.init_from is not None:
        from jaxkv.api import load

        llm = load(section.init_from, dtype="float32")
        model_cfg, params, tokenizer = llm.config, llm.params, tokenizer or llm.tokenizer
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise JaxkvError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the vocab_size "
                             f"{model_cfg.vocab_size} of {section.init_from}")
        if section.kv_sharing:
            shared = with_sharing(model_cfg, section.kv_sharing)
            model_cfg, params = share_kv(model_cfg, params, shared.kv_sources, shared.window_layers)
    else:
        model_cfg = resolve_config(section.config).replace(vocab_size=tokenizer.vocab_size, dtype="float32",
                                                           param_dtype="float32")
        if section.kv_sharing:
            model_cfg = with_sharing(model_cfg, section.kv_sharing)
        params = None
    if section.upward_passes:
        no_grad, grad = section.upward_passes
        model_cfg = model_cfg.replace(upward_passes_no_grad=no_grad, upward_passes_grad=grad)
    if section.upward_schedule:
        model_cfg = model_cfg.replace(upward_schedule=section.upward_schedule)
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise JaxkvError(f"data.seq_len {cfg.data.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    return model_cfg, init_params(model_cfg, init_key) if params is None else params, tokenizer


# --- optimization ----------------------------------------------------------------------------
def lr_schedule(t: TrainSection) -> optax.Schedule:
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to lr * min_lr_ratio at the
    last step. Indexed by optax's update count, so update n (from 0) uses the rate of step n + 1."""
    base = optax.warmup_cosine_decay_schedule(0.0, t.lr, t.warmup_steps, max(t.steps, t.warmup_steps + 1),
                                              t.lr * t.min_lr_ratio)
    return lambda count: base(count + 1)


def decay_mask(params) -> dict:
    """Weight decay on weight matrices only. Not on norm scales. Not on the embedding table:
    the rows of tokens absent from a batch get no gradient, so decay alone would shrink them."""
    return {module: jax.tree.map(lambda p, m=module: m != "embed" and p.ndim >= 2, subtree)
            for module, subtree in params.items()}


def optimizer(t: TrainSection) -> optax.GradientTransformation:
    clip = optax.clip_by_global_norm(t.clip_norm) if t.clip_norm else optax.identity()
    return optax.chain(clip, optax.adamw(lr_schedule(t), t.b1, t.b2, weight_decay=t.weight_decay, mask=decay_mask))


def mean_nll(model_cfg: ModelConfig, params, rows, remat: bool = False) -> jax.Array:
    """Mean next-token cross-entropy (float32) of rows [B, T + 1]."""
    logits = sequence_logits(model_cfg, params, rows[:, :-1], remat=remat)
    return optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean()


def train_step(state: dict, rows, *, model_cfg: ModelConfig, tx: optax.GradientTransformation, grad_accum: int,
               remat: bool) -> tuple[dict, dict]:
    """One optimizer update on a batch of rows, its gradient the mean over `grad_accum` equal
    microbatches: the update of the whole batch, with the activations of one microbatch."""
    params = state["params"]
    grad_fn = jax.value_and_grad(functools.partial(mean_nll, model_cfg, remat=remat))

    def accumulate(total, micro):
        return jax.tree.map(jnp.add, total, grad_fn(params, micro)), None

    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    micro = constrain(rows.reshape(grad_accum, -1, rows.shape[-1]), None, "batch")  # each microbatch data-parallel
    total, _ = jax.lax.scan(accumulate, zero, micro)
    loss, grads = jax.tree.map(lambda x: x / grad_accum, total)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state}
    return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}


# --- run directory ---------------------------------------------------------------------------
def _read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past `step`: a resumed run logs those steps again."""
    if path.is_file():
        path.write_text("".join(json.dumps(r) + "\n" for r in _read_metrics(path) if r["step"] <= step))


def _restore(manager: ocp.CheckpointManager, state: dict) -> tuple[int, dict, dict]:
    step = manager.latest_step()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(state),
                                                                   progress=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for a tree that does not match
        raise JaxkvError(f"cannot resume from {manager.directory}/{step} (does it belong to another config? "
                         f"use a new out directory): {(str(e).splitlines() or [''])[0]}") from None
    return step, restored.state, restored.progress


def _write_final(run_dir: Path, model_cfg: ModelConfig, tokenizer: Tokenizer, params) -> Path:
    """run_dir/final as a jaxkv checkpoint, replaced whole: an interrupted write leaves the old one."""
    final = run_dir / FINAL_DIR
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=f".{FINAL_DIR}-") as work:
        built = save_checkpoint(Path(work) / FINAL_DIR, model_cfg.replace(dtype="float32", param_dtype="float32"),
                                tokenizer, params)
        if final.exists():
            os.replace(final, Path(work) / "old")
        os.replace(built, final)
    return final


# --- the run ---------------------------------------------------------------------------------
def _progress(batches: Batches, step: int) -> dict:
    """What a checkpoint holds beside the state: the step, the data position and the data key."""
    epoch, within = batches.position(step)
    return {"step": step, "epoch": epoch, "batch_in_epoch": within, "rows": len(batches.rows),
            "batch_size": batches.batch_size, "data_key": np.asarray(batches.key).tolist()}


def _run_steps(cfg: TrainConfig, state: dict, start: int, batches: Batches, val_batches: np.ndarray,
               model_cfg: ModelConfig, manager: ocp.CheckpointManager, log: Callable[[dict], None],
               mesh: jax.sharding.Mesh | None) -> tuple[dict, float]:
    """Steps start + 1 .. train.steps with logging, evaluation and checkpoints as configured; with a mesh
    (in context), each batch is split over its data axes. Returns the final state and the seconds spent
    compiling the train step."""
    def place(rows: np.ndarray):
        return put(rows, mesh, "batch")

    t = cfg.train
    compute_cfg = model_cfg.replace(dtype=t.compute_dtype, param_dtype="float32")
    step_fn = jax.jit(functools.partial(train_step, model_cfg=compute_cfg, tx=optimizer(t), grad_accum=t.grad_accum,
                                        remat=t.remat), donate_argnums=0)
    eval_fn = jax.jit(functools.partial(mean_nll, compute_cfg))
    schedule = lr_schedule(t)
    began = time.perf_counter()
    step_exe = step_fn.lower(state, place(batches[start])).compile()  # once: every batch has the same shape
    compile_s = time.perf_counter() - began

    with tqdm(total=t.steps, initial=start, desc="training", unit="step", dynamic_ncols=True) as bar:
        window_start, window_steps = time.perf_counter(), 0
        for index in range(start, t.steps):
            step = index + 1
            state, metrics = step_exe(state, place(batches[index]))
            window_steps += 1
            bar.update(1)
            if step % t.log_every == 0 or step == t.steps:
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "loss": float(metrics["loss"]), "lr": float(schedule(index)),
                          "grad_norm": float(metrics["grad_norm"]),
                          "tokens_per_s": window_steps * t.batch_size * cfg.data.seq_len / elapsed,
                          "step_time_s": elapsed / window_steps}
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:,.0f}")
                log(record)
                window_start, window_steps = time.perf_counter(), 0
            evaluate = bool(t.eval_every) and step % t.eval_every == 0 or step == t.steps
            save = step % cfg.checkpoint.every == 0 or step == t.steps
            if evaluate or save:
                jax.block_until_ready(state)
                paused = time.perf_counter()  # evaluation and saving stay out of the step times
                if evaluate:
                    val_loss = float(np.mean(jax.device_get([eval_fn(state["params"], place(b)) for b in val_batches])))
                    log({"step": step, "val_loss": val_loss, "val_ppl": float(np.exp(val_loss))})
                if save:
                    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               progress=ocp.args.JsonSave(_progress(batches, step))))
                window_start += time.perf_counter() - paused
    return state, compile_s


def train(config: TrainConfig | str | Path, steps: int | None = None, out: str | Path | None = None,
          callback: Callable[[dict], None] | None = None, mesh: str | None = None) -> TrainResult:
    """Train as `config` (a TrainConfig or a YAML path) says, resuming from `out`'s latest
    checkpoint. `steps`, `out` and `mesh` override the config's. `callback` gets every metrics record
    as it is written; an exception from it ends the run as an interruption would."""
    cfg = (config if isinstance(config, TrainConfig) else TrainConfig.load(config)).with_overrides(steps, out, mesh)
    t = cfg.train
    run_dir = Path(cfg.out).expanduser().absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    init_key, data_key = jax.random.split(jax.random.PRNGKey(t.seed))

    split = load_split(cfg.data.source, cfg.data.validation, cfg.data.validation_fraction, cfg.data.jsonl_field)
    model_cfg, params, tokenizer = _model(cfg, split, run_dir, init_key)
    train_rows = packed_rows(split.train, tokenizer, cfg.data.seq_len, "training")
    val_batches = eval_batches(packed_rows(split.validation, tokenizer, cfg.data.seq_len, "validation"),
                               t.microbatch, t.eval_batches)
    tx = optimizer(t)
    state = {"params": params, "opt_state": tx.init(params)}
    mesh = make_mesh(t.mesh) if t.mesh else None
    if mesh is not None:  # parameters and optimizer state sharded as the rules say (FSDP: along embed)
        shardings = param_shardings(model_cfg, mesh)
        state = jax.device_put(state, {"params": shardings,
                                       "opt_state": opt_state_shardings(tx, params, shardings, mesh)})

    metrics_path = run_dir / METRICS_FILE
    manager = ocp.CheckpointManager(run_dir / CHECKPOINTS_DIR,
                                    options=ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep, create=True))
    start, compile_s = 0, 0.0
    try:
        if manager.latest_step() is not None:
            start, state, progress = _restore(manager, state)
            if (progress["rows"], progress["batch_size"]) != (len(train_rows), t.batch_size):
                raise JaxkvError(f"the checkpoint at step {start} in {run_dir} read {progress['rows']} rows in batches "
                                 f"of {progress['batch_size']}; this config gives {len(train_rows)} in batches of "
                                 f"{t.batch_size} (the data, tokenizer, seq_len or batch changed): use a new out")
            if start > t.steps:
                raise JaxkvError(f"the run in {run_dir} is at step {start}, past train.steps {t.steps}")
            data_key = jnp.asarray(progress["data_key"], jnp.uint32)
            print(f"jaxkv: resuming {run_dir} at step {start}", file=sys.stderr)
        _truncate_metrics(metrics_path, start)
        if start < t.steps:
            with open(metrics_path, "a") as metrics_file, \
                    jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
                def log(record: dict) -> None:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    if callback is not None:
                        callback(record)

                state, compile_s = _run_steps(cfg, state, start, Batches(train_rows, t.batch_size, data_key),
                                              val_batches, model_cfg, manager, log, mesh)
    finally:
        manager.wait_until_finished()
        manager.close()

    final = run_dir / FINAL_DIR
    if start < t.steps or not final.is_dir():
        final = _write_final(run_dir, model_cfg, tokenizer, state["params"])
    records = _read_metrics(metrics_path)
    logged = [r for r in records if "loss" in r]
    evals = [{k: r[k] for k in ("step", "val_loss", "val_ppl")} for r in records if "val_loss" in r]
    return TrainResult(
        out=run_dir, final=final, steps=t.steps, parameters=sum(int(np.size(p)) for p in jax.tree.leaves(state["params"])),
        kv_bytes_per_token=kv_bytes_per_token(model_cfg), loss=logged[-1]["loss"], val_loss=evals[-1]["val_loss"],
        val_ppl=evals[-1]["val_ppl"], evals=evals, step_time_s=statistics.median(r["step_time_s"] for r in logged),
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in logged), compile_s=compile_s)
