"""GGUF files of every family, as llama.cpp's own converter writes them, against transformers on the original model.

The truth on both sides is independent of jaxkv: tiny random models are written by transformers itself
(`conftest.write_tiny_hf_model`) and turned into GGUF files by llama.cpp's convert_hf_to_gguf.py (from the
llama-cpp-python sdist, which vendors llama.cpp; fetched once with pip, never installed); jaxkv loads each file
and must compute transformers' logits and greedy tokens on the original model. Checked too: refusals are one
line that names what is refused.

A GGUF cannot carry everything an HF config can, so the tiny models keep to what it can (`GGUF_FAMILIES`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import jaxkv
from conftest import relative_error, write_tiny_hf_model
from jaxkv.cache.dense import KVCache
from jaxkv.checkpoints.hf_config import model_config
from jaxkv.checkpoints.registry import file_lock, jaxkv_home, pip_download
from jaxkv.errors import JaxkvError
from jaxkv.generate.sampling import SamplingParams
from jaxkv.model.decoder import forward
from test_architectures import _hf_greedy
from test_gguf import write_gguf

LLAMA_CPP = "llama-cpp-python==0.3.36"  # pinned: its llama.cpp converter is the truth these tests were checked on

# The tiny models carry SmolLM2's tokenizer (a BPE llama.cpp's converter recognises, as "smollm"), hence its vocab.
_TOKENIZER = dict(vocab_size=49152, bos_token_id=1, eos_token_id=2)
# conftest.TINY_FAMILIES -> what a GGUF can carry of it. llama.cpp's Gemma 2 converter drops lm_head (llama.cpp
# ties Gemma 2's head); a GGUF has no query_pre_attn_scalar (llama.cpp scales Gemma's queries by head_dim); and
# llama.cpp's Gemma 3 has its global layer every 6th. Its llama and qwen2 graphs have no sliding window, and its
# converter writes none for them, so the windowed Mistral and Qwen2 of TINY_FAMILIES have no GGUF form.
GGUF_FAMILIES = {
    "llama-bias": {},  # Llama's Q/K permutation, biases included
    "qwen2": {},
    "qwen3": {},
    "gemma2": dict(tie_word_embeddings=True, query_pre_attn_scalar=16),
    "gemma3": dict(query_pre_attn_scalar=16, num_hidden_layers=6,
                   layer_types=["sliding_attention"] * 5 + ["full_attention"]),
}

# llama.cpp's converter, run as it is but for how it reads the tokenizer: as tokenizer.json says (transformers 5
# would rebuild a qwen2 model's with Qwen's own split regex), and with the converter's own BPE writer where a family
# wants a SentencePiece tokenizer.model (Gemma 2; Qwen2 tries it first). Weights and metadata take the real path.
_CONVERT = """
import runpy, sys
root = sys.argv[1]
sys.path[:0] = [root, root + "/gguf-py"]
import transformers
from conversion import base
transformers.AutoTokenizer.from_pretrained = transformers.PreTrainedTokenizerFast.from_pretrained
base.TextModel._set_vocab_sentencepiece = lambda self, add_to_gguf=True: self._set_vocab_gpt2()
sys.argv = [root + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
_VENDORED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")


@pytest.fixture(scope="session")
def llama_cpp() -> Path:
    """llama.cpp's convert_hf_to_gguf.py with its conversion/ package and gguf-py, from the llama-cpp-python sdist,
    extracted into $JAXKV_HOME/downloads once."""
    dest = jaxkv_home() / "downloads" / LLAMA_CPP.replace("==", "-")
    with file_lock(jaxkv_home() / "locks" / f"{dest.name}.lock"):
        if not (dest / "convert_hf_to_gguf.py").is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
                with tarfile.open(pip_download(LLAMA_CPP, Path(tmp), sdist=True)) as sdist:
                    members = [m for m in sdist.getmembers() if m.name.count("/") >= 3
                               and m.name.split("/", 3)[1:3] == ["vendor", "llama.cpp"]
                               and m.name.split("/", 3)[3].startswith(_VENDORED)]
                    sdist.extractall(Path(tmp) / "sdist", members=members, filter="data")
                os.replace(next((Path(tmp) / "sdist").glob("*/vendor/llama.cpp")), dest)
    return dest


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2's tokenizer.json and tokenizer_config.json, rebuilt from its GGUF."""
    import gguf

    from jaxkv.tokenizer import Tokenizer

    directory = tmp_path_factory.mktemp("smollm2_tokenizer")
    Tokenizer.from_gguf(gguf.GGUFReader(smollm2_gguf)).save(directory)
    return directory


def convert(hf_dir: Path, family: str, llama_cpp: Path, cache: Path) -> Path:
    """The F32 GGUF llama.cpp's converter writes of `hf_dir`, kept in `cache` by the hash of what it reads (the
    family's older files are dropped)."""
    digest = hashlib.sha256(f"{LLAMA_CPP}\n{_CONVERT}".encode())
    for name in sorted(p.name for p in hf_dir.iterdir()):
        digest.update(name.encode() + (hf_dir / name).read_bytes())
    out = cache / f"{family}-{digest.hexdigest()[:16]}.gguf"
    if not out.is_file():
        for old in cache.glob(f"{family}-*.gguf"):
            old.unlink()
        part = out.with_suffix(".part")
        done = subprocess.run([sys.executable, "-c", _CONVERT, str(llama_cpp), str(hf_dir), "--outfile", str(part),
                               "--outtype", "f32"], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        os.replace(part, out)
    return out


@pytest.fixture(scope="module", params=sorted(GGUF_FAMILIES))
def gguf_model(request, tmp_path_factory, llama_cpp, smollm2_tokenizer):
    """(family, the transformers model, its directory, jaxkv's LLM of llama.cpp's GGUF of it)."""
    family = request.param
    directory = tmp_path_factory.mktemp(family)
    hf_model = write_tiny_hf_model(directory, family, **_TOKENIZER, **GGUF_FAMILIES[family])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_tokenizer / name, directory / name)
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    cache = cache.mkdir("jaxkv_gguf_families") if cache else tmp_path_factory.mktemp("gguf")
    return family, hf_model, directory, jaxkv.load(str(convert(directory, family, llama_cpp, cache)))


def test_logits_match_transformers(gguf_model):
    """All-position logits through the dense cache, over the whole vocabulary's ids; and the GGUF reads as the
    config jaxkv reads from the original's config.json."""
    family, hf_model, directory, llm = gguf_model
    tokens = np.random.default_rng(0).integers(0, llm.config.vocab_size, size=(2, 40))
    with torch.no_grad():
        want = hf_model(torch.tensor(tokens)).logits.numpy()
    got, _ = forward(llm.config, llm.params, tokens, KVCache.init(llm.config, 2, 64))
    assert relative_error(got[:, -1], want[:, -1]) < 1e-4, f"{family}: last-position logits differ"
    assert relative_error(got, want) < 1e-4, f"{family}: logits differ"
    want = model_config(json.loads((directory / "config.json").read_text()), llm.config.name, "config.json")
    assert llm.config.norm_eps == pytest.approx(want.norm_eps, rel=1e-7)  # a float32 in the GGUF
    assert llm.config.replace(norm_eps=want.norm_eps) == want, family


@pytest.mark.parametrize("gguf_model", ["gemma2", "gemma3"], indirect=True)
def test_greedy_continuation_matches_transformers(gguf_model):
    """16 greedy tokens after a prompt longer than the Gemmas' window of 8, through the paged engine (window pages,
    soft-caps, local RoPE; the logits test covers the other families' layers, which the paged engine runs as it
    runs HF-directory models in tests/test_architectures.py)."""
    family, hf_model, _, llm = gguf_model
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, llm.config.vocab_size, size=21)]
    got = llm.generate_ids([prompt], 16, SamplingParams(), ignore_eos=True)[0].token_ids
    assert got == _hf_greedy(hf_model, prompt, 16), f"{family}: greedy tokens differ"


@pytest.mark.parametrize("arch, meta, named", [
    ("gptneox", {}, "'gptneox'"),
    ("llama", {"attention.sliding_window": 4096}, "llama.attention.sliding_window=4096"),
    ("qwen3", {"attn_logit_softcapping": 30.0}, "qwen3.attn_logit_softcapping=30.0"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "gemma3.attn_logit_softcapping=50.0"),
    ("qwen2", {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}, "qwen2.rope.scaling.type='yarn'"),
    ("gemma2", {"attention.value_length": 32}, "gemma2.attention.value_length=32"),
    ("qwen3", {"rope.dimension_count": 32}, "qwen3.rope.dimension_count=32"),
    ("gemma2", {"rope.freq_base_swa": 10000.0, "rope.scaling.factor": 2.0}, "gemma2.rope.freq_base_swa=10000.0"),
])
def test_what_jaxkv_cannot_read_is_a_one_line_error(tmp_path, arch, meta, named):
    """An architecture jaxkv does not read, or metadata that llama.cpp's graph for the architecture would not apply
    (or that jaxkv cannot), fails `jaxkv.load` with one line naming it."""
    path = write_gguf(tmp_path / "m.gguf", {}, arch=arch, **{"attention.key_length": 64, **meta})
    with pytest.raises(JaxkvError) as info:
        jaxkv.load(str(path))
    message = str(info.value)
    assert named in message and "\n" not in message, message
