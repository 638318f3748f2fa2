"""Documents -> packed token rows -> batches, with the rows cached on disk.

Documents are tokenized without special tokens and each is followed by EOS, so the
model learns where a text ends. The stream is cut into rows of `seq_len + 1` tokens
(inputs are row[:-1], targets row[1:]); row i starts at token i * seq_len, so neighbours
share one token and every next-token pair of the stream is a target exactly once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence

import jax
import numpy as np
import tokenizers
from tokenizers import decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from tqdm.auto import tqdm

from jaxkv.checkpoints.registry import jaxkv_home
from jaxkv.data.corpus import Document
from jaxkv.errors import JaxkvError
from jaxkv.tokenizer import Tokenizer

BPE_EOS = "<|endoftext|>"
_CACHE_FORMAT = 1  # bump when packing changes, so stale caches are not reused
_ENCODE_CHUNK = 64  # documents per encode_batch call (one progress-bar tick)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A GPT-2 style byte-level BPE trained on `texts`, with BPE_EOS as its EOS. Byte-level
    means any text encodes, so the 256 byte symbols plus EOS are the smallest vocabulary."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise JaxkvError(f"tokenizer.train_bpe must be at least {len(alphabet) + 1} (bytes + EOS), got {vocab_size}")
    hf = tokenizers.Tokenizer(BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOS],
                                             initial_alphabet=alphabet, show_progress=False))
    return Tokenizer(hf, eos_ids=(hf.token_to_id(BPE_EOS),))


def pack(token_lists: Iterable[Sequence[int]], eos_id: int, seq_len: int) -> np.ndarray:
    """int32 rows [n, seq_len + 1] of the documents' tokens, each document followed by EOS.
    The tail shorter than a row is dropped."""
    stream = np.concatenate([np.append(np.asarray(ids, np.int32), np.int32(eos_id)) for ids in token_lists])
    n_rows = (len(stream) - 1) // seq_len
    starts = np.arange(n_rows)[:, None] * seq_len
    return stream[starts + np.arange(seq_len + 1)[None, :]]


def packed_rows(docs: Sequence[Document], tokenizer: Tokenizer, seq_len: int, what: str) -> np.ndarray:
    """`pack` of the documents, read from $JAXKV_HOME/datasets/tokens when this exact text,
    tokenizer and seq_len were packed before (memory-mapped, so a large corpus stays on disk)."""
    if not tokenizer.eos_ids:
        raise JaxkvError("the tokenizer has no EOS token to separate documents")
    key = hashlib.sha256()
    key.update(json.dumps([_CACHE_FORMAT, seq_len, tokenizer.eos_ids[0], tokenizer.hf.to_str()]).encode())
    for doc in docs:
        key.update(hashlib.sha256(doc.text.encode()).digest())
    path = jaxkv_home() / "datasets" / "tokens" / f"{key.hexdigest()[:32]}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    texts = [d.text for d in docs]
    ids = []
    for start in tqdm(range(0, len(texts), _ENCODE_CHUNK), desc=f"tokenizing {what}", unit="chunk"):
        ids += [e.ids for e in tokenizer.hf.encode_batch(texts[start:start + _ENCODE_CHUNK], add_special_tokens=False)]
    rows = pack(ids, tokenizer.eos_ids[0], seq_len)
    if not len(rows):
        raise JaxkvError(f"the {what} text is {sum(map(len, ids))} tokens, too short for one row of "
                         f"seq_len + 1 = {seq_len + 1}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy", delete=False) as tmp:
        np.save(tmp, rows)
    os.replace(tmp.name, path)
    return rows


class Batches:
    """Training batches as a pure function of the step: epoch e visits the rows in the order
    of a permutation keyed by (key, e), so batch s is known without replaying the ones before
    it and a resumed run reads exactly the data an uninterrupted one would."""

    def __init__(self, rows: np.ndarray, batch_size: int, key: jax.Array):
        if len(rows) < batch_size:
            raise JaxkvError(f"the training text packs into {len(rows)} rows, fewer than batch_size {batch_size}")
        self.rows = rows
        self.batch_size = batch_size
        self.key = key
        self.per_epoch = len(rows) // batch_size  # the remainder of each permutation is skipped

    def position(self, index: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of batch `index`."""
        return divmod(index, self.per_epoch)

    @functools.lru_cache(maxsize=2)
    def _order(self, epoch: int) -> np.ndarray:
        return np.asarray(jax.random.permutation(jax.random.fold_in(self.key, epoch), len(self.rows)))

    def __getitem__(self, index: int) -> np.ndarray:
        epoch, within = self.position(index)
        take = self._order(epoch)[within * self.batch_size:(within + 1) * self.batch_size]
        return np.asarray(self.rows[np.sort(take)])


def eval_batches(rows: np.ndarray, batch_size: int, n_batches: int) -> np.ndarray:
    """The first `n_batches` full batches of held-out rows [n, batch_size, seq_len + 1]: the
    same every evaluation, so validation losses of a run (and of runs) compare."""
    n = min(n_batches, len(rows) // batch_size)
    if n == 0:
        raise JaxkvError(f"the validation text packs into {len(rows)} rows, fewer than one batch of {batch_size}")
    return np.asarray(rows[:n * batch_size]).reshape(n, batch_size, rows.shape[1])
