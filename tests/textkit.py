"""Offline text-tower fixtures: tokenizers trained on a few sentences, and full SigLIP/CLIP
checkpoints (random init, every parameter perturbed) saved with their tokenizer like a hub folder."""

from __future__ import annotations

import io
import json
from pathlib import Path

SENTENCES = [
    "a photo of a cat sitting on a red sofa",
    "a photo of a dog running in the park",
    "an astronaut floating in space near a rocket",
    "a cup of coffee on a wooden table",
    "a horse standing in a green field",
    "the rocket launches into the blue sky",
    "two cats and one dog play together",
    "a camera man with a tripod on the grass",
    "microscope image of stained tissue cells",
    "photograph of a city street at night with cars",
]

# Awkward inputs: punctuation, capitals, unicode, CJK, emoji, tabs/newlines, empty, too long.
AWKWARD = [
    "a photo of a cat.",
    "A PHOTO of a Dog!!!",
    "it's the cat's toy, isn't it?",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nmixed",
    "café naïve résumé Ångström",
    "東京の猫 and 北京 dog",
    "emoji 🐱🐶🚀 party",
    "",
    "...!!!???",
    "numbers 12345 and 3.14 and -7",
    "hyphen-ated/slashed_words (parens) [brackets] {braces}",
    " ".join(SENTENCES * 4),  # longer than every maximum
]


def train_spiece(folder: Path) -> Path:
    """A sentencepiece unigram model laid out like SigLIP's (<pad>=0, </s>=1, <unk>=2)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([s.lower() for s in SENTENCES] * 3), model_writer=model, vocab_size=80,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "SiglipTokenizer", "model_max_length": 64, "do_lower_case": True,
        "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
    }))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}))
    return folder


def train_clip_bpe(folder: Path) -> Path:
    """CLIP-format vocab.json + merges.txt: byte-level BPE with </w>, specials as the last ids."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    from arrowvision.model.tokenizer import clip_bpe

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    base = Tokenizer(BPE(end_of_word_suffix="</w>"))
    reference = clip_bpe({"<|startoftext|>": 0, "<|endoftext|>": 1}, [], "<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
    base.normalizer, base.pre_tokenizer = reference.normalizer, reference.pre_tokenizer
    base.train_from_iterator(SENTENCES * 3, BpeTrainer(vocab_size=400, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False))
    state = json.loads(base.to_str())["model"]
    vocab: dict[str, int] = {}
    for token in sorted(alphabet) + [c + "</w>" for c in sorted(alphabet)] + sorted(state["vocab"], key=state["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [" ".join(m) if isinstance(m, list) else m for m in state["merges"]]
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the largest id, as in openai's vocab (legacy argmax pooling)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    }))
    return folder


def train_gemma_json(folder: Path) -> Path:
    """A Gemma-style tokenizer.json (<pad>=0, <eos>=1, <bos>=2, <unk>=3, "▁" for spaces) set up
    as SigLIP 2's: no <bos>, <eos> appended by the post-processor, padded on the right."""
    from tokenizers import Tokenizer, normalizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tokenizer = Tokenizer(BPE(unk_token="<unk>", fuse_unk=True))  # as Gemma's
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tokenizer.train_from_iterator([s.lower() for s in SENTENCES] * 3, BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
    (folder / "tokenizer.json").write_text(tokenizer.to_str())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "model_max_length": 64, "padding_side": "right",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
    }))
    return folder


def perturb(model, seed: int) -> None:
    """Move every parameter off its init (zero biases, unit LayerNorms, default logit scale/bias)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name in ("logit_scale", "logit_bias"):
                param.copy_(noise * 0.5 + (2.0 if name == "logit_scale" else -1.0))
            elif param.ndim == 1 and "norm" in name and name.endswith("weight"):
                param.add_(noise * 0.2)
            else:
                param.add_(noise * 0.05)


TINY_VISION = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32, patch_size=8)


def save_full_checkpoint(folder: Path, kind: str, *, seed: int = 0, eos_token_id: int | None = None) -> Path:
    """A full SigLIP (spiece or Gemma tokenizer) or CLIP model, perturbed, with its tokenizer files."""
    import torch
    import transformers as tf

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    text = dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72)
    if kind == "siglip":
        train_spiece(folder)
        config = tf.SiglipConfig(vision_config=TINY_VISION, text_config={**text, "vocab_size": 128, "projection_size": TINY_VISION["hidden_size"]})
        model = tf.SiglipModel(config)
    elif kind == "siglip2":
        train_gemma_json(folder)
        config = tf.SiglipConfig(vision_config=TINY_VISION, text_config={**text, "vocab_size": 300, "projection_size": TINY_VISION["hidden_size"], "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2})
        model = tf.SiglipModel(config)
    elif kind == "clip":
        train_clip_bpe(folder)
        vocab_size = len(json.loads((folder / "vocab.json").read_text()))
        eos = vocab_size - 1 if eos_token_id is None else eos_token_id
        config = tf.CLIPConfig(vision_config=TINY_VISION, projection_dim=24,
                               text_config={**text, "vocab_size": vocab_size, "bos_token_id": vocab_size - 2, "eos_token_id": eos, "pad_token_id": 1})
        model = tf.CLIPModel(config)
    else:
        raise ValueError(kind)
    perturb(model, seed + 1)
    model.eval().save_pretrained(folder)
    return folder


def hf_tokenizer(folder: Path):
    import transformers as tf

    return tf.AutoTokenizer.from_pretrained(str(folder))
