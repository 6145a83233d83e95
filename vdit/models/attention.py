"""One attention entry point with segment masks, over three backends.

`attention(q, k, v, q_segment_ids, kv_segment_ids, backend=...)`:
  q `[B, S, H, Dh]`, k/v `[B, L, H, Dh]`, q_segment_ids `[B, S]`, kv_segment_ids `[B, L]` (ints);
  query s may attend key l only when their segment ids are equal. Returns `[B, S, H, Dh]`.

Backends:
  "xla"    `jax.nn.dot_product_attention(implementation="xla")` with the segment mask: float32
           logits and softmax, a finite mask value; runs anywhere, default on CPU. With
           `matmul_dtype` set (config.model.matmul_dtype) the same math takes QK^T and PV with
           operands in that dtype and float32 sums, and a hand-written backward
           (`attention_mixed.py`: the CPU's AMX path); the other backends ignore it.
  "cudnn"  `jax.nn.dot_product_attention(implementation="cudnn")` with the segment mask; GPU only,
           bfloat16/float16 inputs only (cuDNN's limit).
  "splash" Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) with its
           native segment ids; TPU only. Under a mesh it runs per device in `shard_map`, batch and
           heads split as the logical rules map `activation_batch` / `activation_heads`.
  "block_sparse"  segment-aware flash attention that computes only the (query block, key block)
           pairs whose segments meet (`attention_blocks.py`): a Pallas Mosaic kernel on TPU
           (`attention_pallas_tpu.py`), a Pallas Triton kernel on GPU (`attention_pallas_gpu.py`);
           no dense mask. A packed row then costs about what its videos cost alone. Under a mesh
           it runs per device like splash.
  "auto"   cudnn on GPU, splash on TPU, xla elsewhere; xla also on a GPU for inputs cuDNN cannot
           take (float32, or a head width that is not a multiple of 8). block_sparse is proven exact in Pallas
           interpret mode, and its kernels lower for TPU (Mosaic) and CUDA (Triton) with Pallas's
           block-shape checks (tests, on CPU); `auto` moves to it once it has compiled and been
           timed on a device.
  "memory_proxy"  no real math: a stand-in with a fused kernel's memory footprint (O(S) residuals,
           no S x L logits), for `vdit plan` to cost memory by compiling on CPU.

Self-attention called with `sequence_parallel=True` runs sequence-parallel (Ulysses all-to-all over
heads, `vdit/parallel/context.py`) when the mesh axis of `activation_length` has more than one
device; the chosen backend then runs per device on the whole sequence.

Every query row must see at least one key: the fused kernels do not define rows that see none
(the xla backend gives finite values there). The DiT guarantees this for its calls.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec

from vdit.config import ATTENTION_BACKENDS
from vdit.models import attention_blocks
from vdit.models import attention_pallas_gpu as pallas_gpu
from vdit.models import attention_pallas_tpu as pallas_tpu
from vdit.models.attention_mixed import mixed_attention
from vdit.models.attention_proxy import proxy_attention
from vdit.parallel import context

# The config's backends, and `vdit plan`'s memory proxy (never chosen by a config).
BACKENDS = (*ATTENTION_BACKENDS, "memory_proxy")
_PLATFORM_OF = {"cudnn": ("gpu",), "splash": ("tpu",), "block_sparse": ("gpu", "tpu")}
# Block sizes of the block_sparse kernels per platform (query, key): TPU blocks are multiples of
# 128 lanes; Triton blocks are powers of two. Smaller blocks skip more finely, larger ones run
# closer to peak; these are the usual flash-attention tiles. Keys shorter than the queries (the
# packed text of cross-attention: tens of tokens per clip) take the finer key block below.
BLOCK_SPARSE_BLOCKS = {"tpu": (512, 512), "gpu": (64, 64)}
BLOCK_SPARSE_SHORT_KV = {"tpu": 128, "gpu": 32}


def resolve_backend(backend: str, platform: str | None = None, q=None) -> str:
    """Checks `backend` against the running platform; 'auto' picks the platform's fast kernel
    that takes the queries `q` (when given): a float32 model, or heads of a width cuDNN refuses,
    on a GPU run xla rather than fail."""
    platform = platform or jax.default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r} (config.model.attention); "
                         f"expected one of {BACKENDS}")
    if backend == "auto":
        pick = {"gpu": "cudnn", "tpu": "splash"}.get(platform, "xla")
        if pick == "cudnn" and q is not None and not cudnn_takes(q):
            return "xla"
        return pick
    need = _PLATFORM_OF.get(backend)
    if need is not None and platform not in need:
        raise RuntimeError(
            f"attention backend {backend!r} (config.model.attention) needs a "
            f"{' or '.join(n.upper() for n in need)}, but JAX is running on {platform!r}; use "
            "'xla' or 'auto' on this machine")
    return backend


def attention(q, k, v, q_segment_ids, kv_segment_ids, backend: str = "xla",
              sequence_parallel: bool = False, matmul_dtype=None):
    """Segment-masked multi-head attention, softmax scale 1/sqrt(Dh). Shapes in the module doc."""
    _check_shapes(q, k, v, q_segment_ids, kv_segment_ids)
    backend = resolve_backend(backend, q=q)
    if sequence_parallel and context.sequence_parallel_size() > 1:
        attend = functools.partial(local_attention, backend=backend, shard=False,
                                   matmul_dtype=matmul_dtype)
        return context.sequence_parallel_attention(q, k, v, q_segment_ids, kv_segment_ids, attend)
    return local_attention(q, k, v, q_segment_ids, kv_segment_ids, backend,
                           matmul_dtype=matmul_dtype)


def local_attention(q, k, v, q_segment_ids, kv_segment_ids, backend: str, shard: bool = True,
                    matmul_dtype=None):
    """Dispatch to a resolved backend; `shard=False` when already per device (in shard_map)."""
    if backend == "xla" and matmul_dtype is not None:
        return mixed_attention(q, k, v, q_segment_ids, kv_segment_ids, matmul_dtype)
    if backend == "xla":
        return xla_attention(q, k, v, q_segment_ids, kv_segment_ids)
    if backend == "cudnn":
        return cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids)
    if backend == "memory_proxy":
        return proxy_attention(q, k, v, q_segment_ids, kv_segment_ids,
                               blocks=BLOCK_SPARSE_BLOCKS["gpu"])
    if backend == "block_sparse":
        return block_sparse_attention(q, k, v, q_segment_ids, kv_segment_ids, shard=shard)
    return splash_attention(q, k, v, q_segment_ids, kv_segment_ids, shard=shard)


def _check_shapes(q, k, v, q_seg, kv_seg) -> None:
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"attention expects q [B,S,H,Dh] and k, v [B,L,H,Dh] of equal shapes, got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch, heads or head width")
    if q_seg.shape != q.shape[:2] or kv_seg.shape != k.shape[:2]:
        raise ValueError(f"segment ids {q_seg.shape} / {kv_seg.shape} do not match q {q.shape[:2]} "
                         f"/ k {k.shape[:2]} ([B, S] / [B, L])")


def segment_mask(q_segment_ids, kv_segment_ids):
    """`[B, 1, S, L]` bool: True where query and key share a segment."""
    return (q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :])


def xla_attention(q, k, v, q_segment_ids, kv_segment_ids):
    """Reference-quality attention: float32 logits and softmax, masked with a finite value (JAX's
    own XLA implementation, the numerics of diffusers' scaled_dot_product_attention)."""
    return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(q_segment_ids, kv_segment_ids),
                                        implementation="xla")


def cudnn_takes(q) -> bool:
    """Whether cuDNN's fused attention takes queries `q` [B, S, H, Dh]: bfloat16 or float16, Dh a
    multiple of 8."""
    return q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0


def cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids):
    """cuDNN fused attention; the segment mask becomes its additive bias."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention backend 'cudnn' needs bfloat16 or float16 inputs, got "
                         f"{q.dtype}; set config.model.dtype='bfloat16' or use backend 'xla'")
    mask = segment_mask(q_segment_ids, kv_segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


def splash_attention(q, k, v, q_segment_ids, kv_segment_ids, *, interpret: bool = False,
                     block: int = 512, shard: bool = True):
    """Pallas splash attention; sequences are padded to a multiple of the block size.

    `interpret=True` runs the kernel in the Pallas interpreter (any platform; tests use it).
    `shard=False` skips the shard_map (the caller is already per device).
    """
    s, l_len = q.shape[1], k.shape[1]
    bq, bkv = min(block, _round_up(s, 128)), min(block, _round_up(l_len, 128))
    s_pad, l_pad = _round_up(s, bq), _round_up(l_len, bkv)
    # Pad queries with the first key's id (they see >= 1 key, so no 0/0 in the kernel, even in
    # the backward pass) and keys with -1 (never equal to a query's id).
    q_seg = _pad_axis1(q_segment_ids, s_pad, kv_segment_ids[:, :1])
    kv_seg = _pad_axis1(kv_segment_ids, l_pad, -1)
    qp, kp, vp = (_pad_axis1(x, n, 0) for x, n in ((q, s_pad), (k, l_pad), (v, l_pad)))
    qp = qp * jnp.asarray(1.0 / np.sqrt(q.shape[-1]), q.dtype)  # splash does not scale logits
    kernel_fn = functools.partial(_splash_per_device, sizes=(s_pad, l_pad, q.shape[2], bq, bkv),
                                  interpret=interpret)
    return _per_device(kernel_fn, (qp, kp, vp, q_seg, kv_seg), shard)[:, :s]


def _per_device(kernel_fn, args, shard: bool):
    """Runs `kernel_fn(q, k, v, q_seg, kv_seg)` per device under a mesh (batch and heads split as
    the logical rules say), or directly without one or when `shard` is False."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not shard:
        return kernel_fn(*args)
    spec = nn.logical_to_mesh_axes(("activation_batch", None, "activation_heads", None))
    seg_spec = PartitionSpec(spec[0], None)
    return jax.shard_map(kernel_fn, mesh=mesh, in_specs=(spec, spec, spec, seg_spec, seg_spec),
                         out_specs=spec, check_vma=False)(*args)


def block_sparse_attention(q, k, v, q_segment_ids, kv_segment_ids, *, platform: str | None = None,
                           interpret: bool = False, blocks: tuple[int, int] | None = None,
                           shard: bool = True):
    """The block-sparse kernels; sequences are padded to block multiples with ids that meet nothing.

    `platform` picks the kernel ("tpu": Mosaic, "gpu": Triton; default: the running one),
    `interpret=True` runs it in the Pallas interpreter (any machine; tests use it), `blocks`
    overrides `BLOCK_SPARSE_BLOCKS[platform]`, `shard=False` skips the shard_map.
    """
    platform = platform or jax.default_backend()
    if platform not in BLOCK_SPARSE_BLOCKS:
        raise ValueError(f"block_sparse attention has kernels for {tuple(BLOCK_SPARSE_BLOCKS)}, "
                         f"not {platform!r}")
    s, l_len, d = q.shape[1], k.shape[1], q.shape[-1]
    bq, bkv = block_sparse_blocks(platform, s, l_len, blocks)
    s_pad, l_pad = _round_up(s, bq), _round_up(l_len, bkv)
    q_seg = attention_blocks.pad_ids(q_segment_ids, s_pad)  # -1: meets nothing
    kv_seg = attention_blocks.pad_ids(kv_segment_ids, l_pad)
    qp, kp, vp = (_pad_axis1(x, n, 0) for x, n in ((q, s_pad), (k, l_pad), (v, l_pad)))
    if platform == "gpu":  # Triton's dot wants a power-of-two head width >= 16: zero-pad it
        d_pad = max(16, pl.next_power_of_2(d))
        qp, kp, vp = (jnp.pad(x, ((0, 0),) * 3 + ((0, d_pad - d),)) for x in (qp, kp, vp))
        kernel_fn = functools.partial(pallas_gpu.block_sparse_attention, block_q=bq, block_kv=bkv,
                                      scale=1.0 / np.sqrt(d), interpret=interpret)
    else:
        kernel_fn = functools.partial(_tpu_heads_major, block_q=bq, block_kv=bkv,
                                      interpret=interpret)
    return _per_device(kernel_fn, (qp, kp, vp, q_seg, kv_seg), shard)[:, :s, :, :d]


def _tpu_heads_major(q, k, v, q_seg, kv_seg, **kwargs):
    """[B, S, H, Dh] -> the TPU kernel's [B, H, S, Dh] and back."""
    t = lambda x: x.swapaxes(1, 2)  # noqa: E731
    return t(pallas_tpu.block_sparse_attention(t(q), t(k), t(v), q_seg, kv_seg, **kwargs))


def block_sparse_blocks(platform: str, s: int, l_len: int,
                        blocks: tuple[int, int] | None = None) -> tuple[int, int]:
    """(query block, key block) of the block_sparse kernel on `platform` for S queries, L keys.

    `blocks` overrides the platform's; keys shorter than the queries take the finer key block;
    a block longer than its (aligned) sequence shrinks to it.
    """
    bq, bkv = blocks or BLOCK_SPARSE_BLOCKS[platform]
    if l_len < s:
        bkv = min(bkv, BLOCK_SPARSE_SHORT_KV[platform])

    def fit(block, n):
        if platform == "gpu":
            return min(block, max(16, pl.next_power_of_2(n)))
        return min(block, _round_up(n, min(block, 128)))
    return fit(bq, s), fit(bkv, l_len)


def _splash_per_device(q, k, v, q_seg, kv_seg, *, sizes, interpret):
    # The TPU splash kernel (Pallas): imported only where the splash backend runs.
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    s_pad, l_pad, _, bq, bkv = sizes
    heads = q.shape[2]  # local heads under shard_map
    blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                           block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                           block_kv_dq=bkv)
    mask = sa.MultiHeadMask([sa.FullMask((s_pad, l_pad))] * heads)
    kernel = sa.make_splash_mha_single_device(mask, block_sizes=blocks, interpret=interpret)

    def one(qb, kb, vb, qs, ks):  # [S, H, D] -> the kernel's [H, S, D]
        out = kernel(qb.swapaxes(0, 1), kb.swapaxes(0, 1), vb.swapaxes(0, 1),
                     segment_ids=sa.SegmentIds(q=qs, kv=ks))
        return out.swapaxes(0, 1)

    return jax.vmap(one)(q, k, v, q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_axis1(x, size: int, value):
    extra = size - x.shape[1]
    if extra == 0:
        return x
    fill = jnp.broadcast_to(jnp.asarray(value, x.dtype), (x.shape[0], extra) + x.shape[2:])
    return jnp.concatenate([x, fill], axis=1)
