"""`vdit plan`'s attention cost: FLOPs of a step's attention with the block_sparse skip vs dense.

A row of `tokens` holds clips of `clip_tokens` each (as many as fit, the rest padding, which
attends padding); its text of `text_len` tokens is split evenly between the clips, or, with
`data.text_pad_to`, each clip has its own block of that many positions among `max_segments`. The block
pairs the kernels compute come from `attention_blocks.computed_pairs` on that row, at each kernel's
blocks (`attention.block_sparse_blocks`). FLOPs per computed block pair and head: forward 2
matmuls, backward 7 (the dq kernel recomputes q k^T and dO v^T; the dk/dv kernel recomputes both
and adds p^T dO and ds^T q), each 2 x bq x bk x Dh; a dense kernel does the same over every pair.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from vdit.models import attention_blocks
from vdit.models.attention import BLOCK_SPARSE_BLOCKS, block_sparse_blocks

MATMULS_FWD, MATMULS_BWD = 2, 7


def packed_row(tokens: int, clip_tokens: int) -> np.ndarray:
    """`[1, tokens]` ids: clips 1..n of `clip_tokens` (n = tokens // clip_tokens, >= 1), padding 0."""
    clip = min(clip_tokens, tokens)
    clips = tokens // clip
    ids = np.zeros((1, tokens), np.int32)
    ids[0, :clips * clip] = np.repeat(np.arange(1, clips + 1), clip)
    return ids


def _pairs(q_ids, kv_ids, blocks) -> tuple[int, int]:
    """(computed block pairs, all block pairs) of one attention at `blocks`."""
    bq, bk = blocks
    q = attention_blocks.pad_ids(q_ids, -(-q_ids.shape[1] // bq) * bq)
    kv = attention_blocks.pad_ids(kv_ids, -(-kv_ids.shape[1] // bk) * bk)
    computed = attention_blocks.computed_pairs(q, kv, bq, bk)
    return int(jnp.sum(computed)), (q.shape[1] // bq) * (kv.shape[1] // bk)


def padded_text_row(clips: int, pad_to: int, max_segments: int) -> np.ndarray:
    """`[1, max_segments * pad_to]` ids of text laid out in blocks: clips 1..n, the rest 0."""
    blocks = np.arange(1, max_segments + 1) * (np.arange(1, max_segments + 1) <= clips)
    return np.repeat(blocks, pad_to)[None].astype(np.int32)


def attention_cost(model, rows: int, tokens: int, clip_tokens: int, text_len: int,
                   pad_to: int = 0, max_segments: int = 1) -> dict:
    """Per kernel: attention TFLOPs of one step (forward + backward, all layers, self + cross),
    computed with the skip and dense, for `rows` rows. `model`: config.model; `pad_to` > 0: the
    DiT's text in per-clip blocks (`data.text_pad_to`, see vdit/train/objective.py)."""
    heads, head_dim = int(model.num_attention_heads), int(model.attention_head_dim)
    layers = int(model.num_layers)
    q_ids = packed_row(tokens, clip_tokens)
    clips = int(q_ids.max())
    text_ids = (padded_text_row(clips, pad_to, max(max_segments, clips)) if pad_to > 0
                else packed_row(text_len, max(1, text_len // clips)))
    out = {"clips_per_row": clips, "clip_tokens": min(clip_tokens, tokens)}
    per_pair = 2 * head_dim * heads * layers * rows * (MATMULS_FWD + MATMULS_BWD)
    for kernel in BLOCK_SPARSE_BLOCKS:
        computed = dense = 0
        for kv_ids in (q_ids, text_ids):
            bq, bk = block_sparse_blocks(kernel, tokens, kv_ids.shape[1])
            done, total = _pairs(q_ids, kv_ids, (bq, bk))
            computed += done * bq * bk
            dense += total * bq * bk
        out[kernel] = {"tflop_block_sparse": computed * per_pair / 1e12,
                       "tflop_dense": dense * per_pair / 1e12, "fraction": computed / dense}
    return out


def format_cost(cost: dict) -> str:
    parts = [f"{k} {v['tflop_block_sparse']:.1f} of {v['tflop_dense']:.1f} dense "
             f"({100 * v['fraction']:.0f}%)" for k, v in cost.items() if isinstance(v, dict)]
    return (f"  attention per step (fwd+bwd, {cost['clips_per_row']} clips of "
            f"{cost['clip_tokens']} tokens per row), TFLOP with block skipping: " + "; ".join(parts))
