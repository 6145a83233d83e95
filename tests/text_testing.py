"""Shared helpers for the text-encoder tests: tiny reference models and offline tokenizers."""

from __future__ import annotations

import io
import os

SENTENCES = [
    "a red circle moving right",
    "a blue square moving left",
    "the green triangle moves up",
    "a small yellow star drifting down",
    "two shapes bounce around the frame",
]

# Two small UMT5 shapes: gated-gelu as in Wan, and a plain relu FFN with other bucket settings.
SMALL_CONFIGS = {
    "gated": dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16,
                  feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6),
    "relu": dict(vocab_size=80, d_model=48, d_kv=12, d_ff=64, num_layers=3, num_heads=2,
                 relative_attention_num_buckets=16, relative_attention_max_distance=24,
                 feed_forward_proj="relu", layer_norm_epsilon=1e-5),
}


def torch_encoder(cfg: dict, seed: int = 0):
    """A random-weight transformers UMT5EncoderModel; norms perturbed so their scales matter."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.UMT5EncoderModel(transformers.UMT5Config(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def save_torch_encoder(model, folder: str) -> str:
    model.save_pretrained(folder)
    return folder


def write_word_tokenizer(folder: str, words=None) -> str:
    """A `tokenizer.json` (WordLevel, whitespace split, T5-style `</s>` appended); returns path."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = words or sorted({w for s in SENTENCES for w in s.split()} | {"&", "<b>"})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.json")
    tok.save(path)
    return path


def train_sentencepiece(folder: str) -> str:
    """A tiny `spiece.model` trained on SENTENCES (pad 0, eos 1, unk 2, no bos); returns path."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_writer=buf, vocab_size=60, pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "spiece.model")
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path
