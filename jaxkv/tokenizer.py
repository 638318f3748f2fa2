"""Text <-> token ids and chat prompts, built from an HF model dir or from a GGUF file's metadata.

Both sources end up as one `tokenizers.Tokenizer` plus the few facts generation needs (BOS, the ids
that end generation, the chat template), so the rest of jaxkv never asks where a model came from.
A GGUF carries no tokenizer.json: `from_gguf` rebuilds the one the model was trained with from
llama.cpp's metadata, including the pre-tokenizer named by `tokenizer.ggml.pre`, because a wrong
pre-tokenizer gives plausible but different ids.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from jaxkv.errors import JaxkvError, check_text

if TYPE_CHECKING:
    import gguf

# llama.cpp's token types (gguf.TokenType).
_CONTROL, _USER_DEFINED = 3, 4

# Split regexes of the original tokenizer.json of each `tokenizer.ggml.pre` family (as llama.cpp and
# transformers' GGUF converter spell them); these vocabularies then run ByteLevel without its own regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (  # Llama 3's, but digits one at a time
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PRE = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT, "pixtral": _LLAMA3_SPLIT,
    "tekken": _TEKKEN_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# Qwen's tokenizer.json applies its merges to whole words too (ignore_merges false); the others take a word found
# in the vocabulary as it is.
_MERGE_WHOLE_WORDS = {"qwen2", "deepseek-r1-qwen"}
# Pre types whose original tokenizer.json uses GPT-2's regex (ByteLevel's own), optionally after
# isolating every digit (SmolLM's Digits(individual_digits=True), llama.cpp's "\p{N}" pass).
_GPT2_PRE = {"default": False, "gpt2": False, "smollm": True}


def _byte_level(use_regex: bool) -> pre_tokenizers.ByteLevel:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=use_regex)


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), "isolated"), _byte_level(False)])
    if pre in _GPT2_PRE:
        if _GPT2_PRE[pre]:
            return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level(True)])
        return _byte_level(True)
    raise JaxkvError(f"GGUF tokenizer pre-tokenizer {pre!r} is not supported "
                     f"(supported: {', '.join(sorted({*_SPLIT_PRE, *_GPT2_PRE}))})")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level vocabularies are spelled."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(shifted)}


@functools.cache
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in _bytes_to_unicode().items()}


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback tokens


def _gguf_byte_level(tokens: list[str], merges: list[str], pre: str) -> tokenizers.Tokenizer:
    """GPT-2 style byte-level BPE. llama.cpp stores user-defined tokens as plain text; respell those
    in the byte alphabet so the vocabulary is uniform (as transformers' converter does)."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)}
    model = BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], continuing_subword_prefix="",
                end_of_word_suffix="", fuse_unk=False, ignore_merges=pre in _SPLIT_PRE and pre not in _MERGE_WHOLE_WORDS)
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece GGUFs carry scores, not merges: every split of a token into two known tokens is a
    merge, ranked by the merged token's score (the same order transformers' `generate_merges` builds)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        merges += [(l, r, score) for l, r in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(l, r) for l, r, _ in merges]


def _gguf_sentencepiece(tokens: list[str], scores: list[float] | None, merges: list[str] | None,
                        unk: str | None, add_space_prefix: bool) -> tokenizers.Tokenizer:
    """Llama/Mistral SentencePiece BPE as tokenizers runs it: Metaspace words, byte fallback for
    characters outside the vocabulary."""
    if merges is not None:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    elif scores is not None:
        pairs = _merges_from_scores(tokens, scores)
    else:
        raise JaxkvError("GGUF SentencePiece tokenizer has neither merges nor scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(BPE(vocab, pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return tok


def _bos_processor(bos_token: str, bos_id: int, add_bos: bool) -> processors.TemplateProcessing:
    if not add_bos:
        return processors.TemplateProcessing(single="$A", pair="$A $B:1")
    return processors.TemplateProcessing(single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token}:1 $B:1",
                                         special_tokens=[(bos_token, bos_id)])


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise JaxkvError(f"cannot read {path}: {e}") from None


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' `tojson`: Jinja's own escapes HTML characters, which would change prompts."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


class _GenerationTag(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}`, which marks the assistant's text for training
    masks (SmolLM3, some Qwen and Llama fine-tunes): it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _TemplateDict:
    """transformers' `dict` global: builds dicts, without exposing the type itself to the template."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """transformers' `namespace`: Jinja's, refusing underscore-prefixed attributes (a way into CPython internals)."""

    def __init__(*args, **kwargs):  # Jinja's signature trick, so that `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")


@functools.lru_cache(maxsize=8)
def _compile_chat_template(template: str) -> jinja2.Template:
    """Compile in the environment transformers renders chat templates in (`chat_template_utils.
    _compile_jinja_template`: the same sandbox, whitespace settings, extensions, filters and globals), so
    prompts match the model card's."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)


# The names a message's reasoning comes under; templates (Qwen3's) read the first.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _template_message(message: Any) -> dict:
    """A message as transformers hands it to the template: keys whose value is None dropped (OpenAI clients send
    `content: null`; templates handle a missing key, not a None), the reasoning under every name templates read."""
    if not isinstance(message, dict):
        raise JaxkvError(f"a chat message must be a dict with 'role' and 'content', got {type(message).__name__}")
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split()) or "(no message)"
    return text if isinstance(error, jinja2.TemplateError) else f"{type(error).__name__}: {text}"


class Tokenizer:
    """A `tokenizers.Tokenizer` (`hf`) and the special ids generation needs.

    `eos_ids` holds every id that ends generation (tokenizer EOS, plus generation_config's or
    llama.cpp's end-of-turn ids), first the tokenizer's own EOS.
    """

    def __init__(self, hf: tokenizers.Tokenizer, bos_id: int | None = None, eos_ids: tuple[int, ...] = (),
                 chat_template: str | None = None):
        self.hf = hf
        self.bos_id = bos_id
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))
        self.chat_template = chat_template

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.hf.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return self.hf.id_to_token(self.eos_ids[0]) if self.eos_ids else None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def add_bos(self) -> bool:
        """Whether `encode` prepends BOS; the post-processor decides, so ask it."""
        return self.bos_id is not None and self.hf.encode("", add_special_tokens=True).ids[:1] == [self.bos_id]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; InvalidRequest (a JaxkvError) if text holds a lone surrogate, which the
        tokenizer cannot take (e.g. undecodable bytes in a command-line argument)."""
        return self.hf.encode(check_text(text, "prompt"), add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """A token's own bytes (part of a character, for a byte-level token inside one): what OpenAI's logprobs
        report as `bytes`. Read from the vocabulary through the decoder's scheme, so no decode is guessed."""
        return self._token_bytes(int(token_id))

    def token_text(self, token_id: int) -> str:
        """A token's display string: its bytes as UTF-8, partial characters escaped."""
        return self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")

    @functools.cached_property
    def _decoder_kinds(self) -> tuple[bool, bool]:
        """(byte-level, metaspace): how the vocabulary spells a token's bytes."""
        try:
            decoder = json.loads(self.hf.to_str()).get("decoder") or {}
        except Exception:  # noqa: BLE001 - an exotic tokenizer: fall back to decoding one token
            decoder = {}
        parts = decoder.get("decoders") or ()
        kinds = {decoder.get("type")} | {d.get("type") for d in parts}
        metaspace = "Metaspace" in kinds or any(d.get("type") == "Replace" and "▁" in json.dumps(d) for d in parts)
        return "ByteLevel" in kinds, metaspace

    @functools.lru_cache(maxsize=None)  # noqa: B019 - one tokenizer per model, kept for the model's life
    def _token_bytes(self, token_id: int) -> bytes:
        piece = self.hf.id_to_token(token_id)
        if piece is None:
            return b""
        byte_level, metaspace = self._decoder_kinds
        inverse = _unicode_to_bytes()
        if byte_level and all(c in inverse for c in piece):
            return bytes(inverse[c] for c in piece)
        match = _BYTE_TOKEN.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        if metaspace:
            return piece.replace("▁", " ").encode()
        return self.decode([token_id], skip_special_tokens=False).encode()

    def apply_chat_template(self, messages: str | list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render a conversation (a str is one user turn) as the model's prompt text.

        The template writes any BOS it wants itself, so encode the result with
        `add_special_tokens=False`, or BOS may appear twice.
        """
        if self.chat_template is None:
            raise JaxkvError("model has no chat template")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        messages = [_template_message(m) for m in messages]
        # As transformers: the special tokens the tokenizer has (an absent one is undefined, not "")
        special = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if v is not None}
        try:
            return _compile_chat_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                **special)
        except Exception as e:  # noqa: BLE001 - the template's own raise_exception, or its bug on this input
            raise JaxkvError(f"chat template failed: {_one_line(e)}") from None

    # --- files ---------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and an HF-format tokenizer_config.json, loadable by `load` and transformers."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "add_bos_token": self.add_bos, "add_eos_token": False}
        if len(self.eos_ids) > 1:
            config["eos_token_ids"] = list(self.eos_ids)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read an HF model dir or one written by `save`.

        An explicit `add_bos_token` in tokenizer_config.json overrides tokenizer.json's
        post-processor, as transformers does; otherwise the post-processor decides.
        """
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise JaxkvError(f"no tokenizer.json in {directory}")
        try:
            hf = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on malformed files
            raise JaxkvError(f"cannot read {path}: {e}") from None
        config = _read_json(directory / "tokenizer_config.json")
        generation = _read_json(directory / "generation_config.json")

        def token_id(key: str) -> int | None:
            text = _token_text(config.get(key))
            return None if text is None else hf.token_to_id(text)

        bos_id = token_id("bos_token")
        if bos_id is None:
            bos_id = generation.get("bos_token_id")
        gen_eos = generation.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        eos_ids = [i for i in (token_id("eos_token"), *config.get("eos_token_ids", ()), *gen_eos) if i is not None]

        template = config.get("chat_template")
        if isinstance(template, list):  # older HF: named templates
            template = {t["name"]: t["template"] for t in template}.get("default")
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text()

        tok = cls(hf, bos_id, tuple(eos_ids), template)
        add_bos = config.get("add_bos_token")
        if isinstance(add_bos, bool) and bos_id is not None and add_bos != tok.add_bos:
            hf.post_processor = _bos_processor(tok.bos_token, bos_id, add_bos)
        return tok

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> Tokenizer:
        """Rebuild the tokenizer a GGUF's metadata describes (byte-level "gpt2" or SentencePiece "llama").

        Control tokens become special tokens and user-defined ones added tokens, so "<|im_start|>"
        stays one id; BOS is prepended only when `tokenizer.ggml.add_bos_token` says so (SentencePiece
        files that do not say default to yes, like llama.cpp).
        """
        def meta(key: str, default: Any = None) -> Any:
            field = reader.get_field(f"tokenizer.{key}")
            return default if field is None else field.contents()

        kind, tokens = meta("ggml.model"), meta("ggml.tokens")
        if tokens is None:
            raise JaxkvError("GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
        if kind == "gpt2":
            hf = _gguf_byte_level(tokens, meta("ggml.merges", []), meta("ggml.pre", "default"))
        elif kind == "llama":
            unk_id = meta("ggml.unknown_token_id")
            hf = _gguf_sentencepiece(tokens, meta("ggml.scores"), meta("ggml.merges"),
                                     None if unk_id is None else tokens[unk_id], meta("ggml.add_space_prefix", True))
        else:
            raise JaxkvError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")

        types = meta("ggml.token_type") or []
        vocab = hf.get_vocab()
        # Control tokens spelled outside the vocabulary's alphabet are llama.cpp mislabels; adding them
        # would mint ids past the vocabulary, so only tokens the model already knows are registered.
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t, ty in zip(tokens, types) if ty == _CONTROL and t in vocab])
        hf.add_tokens([AddedToken(t, special=False, normalized=False)
                       for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])

        bos_id = meta("ggml.bos_token_id")
        if meta("ggml.add_bos_token", kind == "llama") and bos_id is not None:
            hf.post_processor = _bos_processor(tokens[bos_id], bos_id, True)
        eos_ids = [meta(f"ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        return cls(hf, bos_id, tuple(i for i in eos_ids if i is not None), meta("chat_template"))
