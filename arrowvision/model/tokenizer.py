"""Text tokenizers for the text towers, without transformers.

Built from the tokenizer files stored in the weights file (``WeightLoader.tokenizer_files``) with
the well-kept libraries: ``sentencepiece`` for SigLIP's ``spiece.model``, ``tokenizers`` for a
``tokenizer.json`` (SigLIP 2's Gemma tokenizer, CLIP) or CLIP's ``vocab.json`` + ``merges.txt``.
Ids equal transformers' on each family's standard settings:

- SigLIP (spiece.model): transformers' canonicalization (lowercase, punctuation stripped,
  whitespace collapsed), ``</s>`` appended, truncated keeping the final ``</s>``, padded to 64
  with ``max_length`` padding (the model was trained that way; shorter padding gives wrong results).
- SigLIP 2 (tokenizer.json, Gemma): lowercased (as the model was trained), ``<eos>`` appended by
  the tokenizer's post-processor, padded with ``<pad>`` (id 0) to 64.
- CLIP: the tokenizer's cleaning + lowercase, ``<|startoftext|> ... <|endoftext|>``, at most 77;
  padded to the batch's longest text only (the causal tower's pooled vector ignores what follows
  end-of-text).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from ..errors import FormatError, ModelError
from ..util.safejson import MAX_JSON_BYTES, load_json
from .text_config import CONVERT_HINT, TextConfig

SPIECE_UNDERLINE = "\u2581"
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WHITESPACE = re.compile(r"\s+")


class Tokenizer(Protocol):
    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


def _as_texts(texts: str | Sequence[str]) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise ModelError(f"texts must be strings, got {bad[0]}")
    return texts


def _pad(rows: list[list[int]], pad_id: int, length: int | None, left: bool = False) -> np.ndarray:
    """(N, L) int64: rows padded with ``pad_id`` to ``length`` (or to the longest row)."""
    width = length if length is not None else max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        if row and left:
            out[i, width - len(row) :] = row
        elif row:
            out[i, : len(row)] = row
    return out


def _token(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class SentencePieceTokenizer:
    """SigLIP's tokenizer: transformers' ``SiglipTokenizer`` on its standard settings."""

    def __init__(self, model_proto: bytes, *, max_length: int = 64, lowercase: bool = True,
                 eos_token: str = "</s>", unk_token: str = "<unk>", pad_token: str = "</s>", legacy: bool = True):
        import sentencepiece as spm

        if not legacy:  # transformers turns the dummy prefix off for non-legacy tokenizers
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
            proto.normalizer_spec.add_dummy_prefix = False
            model_proto = proto.SerializeToString()
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.max_length = max_length
        self.lowercase = lowercase
        self.unk_token = unk_token
        self.unk_length = len(self.sp.encode(unk_token, out_type=str))
        self.eos_id = self.sp.piece_to_id(eos_token)
        self.pad_id = self.sp.piece_to_id(pad_token)

    def canonicalize(self, text: str) -> str:
        """big_vision's canonicalization, as transformers: lowercase, no punctuation, single spaces."""
        if self.lowercase:
            text = text.lower()
        return _WHITESPACE.sub(" ", text.translate(_PUNCTUATION)).strip()

    def ids(self, text: str) -> list[int]:
        # transformers prefixes "▁", canonicalizes, then encodes behind the unk token and drops it
        text = self.canonicalize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "))
        pieces = self.sp.encode(self.unk_token + text, out_type=str)
        pieces = pieces[self.unk_length :] if len(pieces) >= self.unk_length else pieces
        ids = [self.sp.piece_to_id(p) for p in pieces][: self.max_length - 1]
        return ids if ids and ids[-1] == self.eos_id else ids + [self.eos_id]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return _pad([self.ids(t) for t in _as_texts(texts)], self.pad_id, self.max_length)


class HFTokenizer:
    """A ``tokenizers`` pipeline (tokenizer.json, or CLIP's vocab + merges) with our padding rule."""

    def __init__(self, tokenizer: Any, *, max_length: int, pad_id: int, pad_to_max_length: bool, lowercase: bool = False,
                 pad_left: bool = False):
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)  # room is kept for the post-processor's special tokens
        self.max_length = max_length
        self.pad_id = pad_id
        self.pad_to_max_length = pad_to_max_length
        self.lowercase = lowercase
        self.pad_left = pad_left

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = _as_texts(texts)
        if self.lowercase:
            texts = [t.lower() for t in texts]
        rows = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
        return _pad(rows, self.pad_id, self.max_length if self.pad_to_max_length else None, left=self.pad_left)


def clip_bpe(vocab: Mapping[str, int], merges: list[tuple[str, str]], bos: str, eos: str, unk: str) -> Any:
    """CLIP's byte-level BPE from ``vocab.json`` + ``merges.txt``, built as transformers builds it."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tokenizer = Tokenizer(BPE(vocab=dict(vocab), merges=merges, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(
            Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
            behavior="removed", invert=True,
        ),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([t for t in dict.fromkeys((bos, eos, unk)) if t in vocab])
    tokenizer.post_processor = processors.RobertaProcessing((eos, vocab[eos]), (bos, vocab[bos]), False, False)
    return tokenizer


def _json_file(files: Mapping[str, bytes], name: str) -> dict:
    """A stored JSON file, through the guard for untrusted JSON (size, depth, finite numbers)."""
    if name not in files:
        return {}
    try:
        value = load_json(files[name], f"stored tokenizer file {name}")
    except FormatError as exc:
        raise ModelError(str(exc)) from None
    if not isinstance(value, dict):
        raise ModelError(f"stored tokenizer file {name} is not a JSON object")
    return value


def _merges(text: str) -> list[tuple[str, str]]:
    lines = [line for line in text.splitlines() if line and not line.startswith("#version")]
    return [tuple(line.split(" ", 1)) for line in lines]  # type: ignore[misc]


def load_tokenizer(files: Mapping[str, bytes], config: TextConfig) -> Tokenizer:
    """The tokenizer for ``config``'s family from the stored files (see module docstring)."""
    settings = _json_file(files, "tokenizer_config.json")
    special = {**_json_file(files, "special_tokens_map.json"), **settings}
    max_length = min(int(settings.get("model_max_length") or config.max_positions), config.max_positions)
    if config.family == "siglip" and "spiece.model" in files:
        return SentencePieceTokenizer(
            files["spiece.model"], max_length=max_length, lowercase=bool(settings.get("do_lower_case", True)),
            eos_token=_token(special.get("eos_token")) or "</s>", unk_token=_token(special.get("unk_token")) or "<unk>",
            pad_token=_token(special.get("pad_token")) or "</s>", legacy=bool(settings.get("legacy", True)),
        )
    from tokenizers import Tokenizer as RustTokenizer

    if "tokenizer.json" in files:
        if len(files["tokenizer.json"]) > MAX_JSON_BYTES:
            raise ModelError(f"stored tokenizer.json has {len(files['tokenizer.json'])} bytes; at most {MAX_JSON_BYTES} allowed")
        try:
            tokenizer = RustTokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        except Exception as exc:  # tokenizers raises its own Exception type for bad JSON
            raise ModelError(f"stored tokenizer.json cannot be loaded: {exc}") from None
    elif config.family == "clip" and {"vocab.json", "merges.txt"} <= set(files):
        vocab = _json_file(files, "vocab.json")
        bos = _token(special.get("bos_token")) or "<|startoftext|>"
        eos = _token(special.get("eos_token")) or "<|endoftext|>"
        if bos not in vocab or eos not in vocab:
            raise ModelError(f"stored vocab.json lacks {bos!r} or {eos!r}")
        tokenizer = clip_bpe(vocab, _merges(files["merges.txt"].decode("utf-8")), bos, eos, _token(special.get("unk_token")) or eos)
    else:
        stored = ", ".join(sorted(files)) or "none"
        raise ModelError(f"no usable {config.family} tokenizer stored (files: {stored}); {CONVERT_HINT} "
                         "from a folder that has spiece.model, tokenizer.json or vocab.json + merges.txt")
    pad_token = _token(special.get("pad_token")) or ("<pad>" if config.family == "siglip" else "<|endoftext|>")
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise ModelError(f"stored tokenizer has no padding token {pad_token!r}")
    siglip = config.family == "siglip"  # SigLIP 2: lowercase, max_length padding; CLIP: pad to the longest
    # transformers' GemmaTokenizer pads on the left unless the config says otherwise (SigLIP 2's says right)
    default_side = "left" if settings.get("tokenizer_class") == "GemmaTokenizer" else "right"
    pad_left = settings.get("padding_side", default_side) == "left"
    return HFTokenizer(tokenizer, max_length=max_length, pad_id=pad_id, pad_to_max_length=siglip, lowercase=siglip, pad_left=pad_left)
