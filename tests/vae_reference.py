"""Shared by the VAE tests: random-weight diffusers `AutoencoderKLWan` references and helpers."""

import functools

import jax
import numpy as np
import torch
from diffusers import AutoencoderKLWan

# Three layouts: Wan2.1's own stage/time layout (spatial 8x, time 4x); a non-default one (3 stages,
# spatial 4x, time 2x in the first stage only, separate decoder width, 2 res blocks); and Wan2.2's
# (residual blocks, 2x2 patching: spatial 16x, time 4x, 12 patched channels, separate decoder width).
CONFIGS = {
    "wan": dict(base_dim=8, z_dim=4, num_res_blocks=1),
    "custom": dict(base_dim=12, decoder_base_dim=8, z_dim=4, dim_mult=[1, 2, 3],
                   num_res_blocks=2, temperal_downsample=[True, False],
                   scale_factor_spatial=4, scale_factor_temporal=2),
    "wan22": dict(base_dim=8, decoder_base_dim=12, z_dim=6, num_res_blocks=1, is_residual=True,
                  patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16,
                  latents_mean=[0.0] * 6, latents_std=[1.0] * 6),
}


# Tiny graphs: XLA's CPU backend optimisations cost more compile time than they save at run time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


# Shared by both VAE test files so equal modules reuse one compilation per input shape.
@functools.partial(jax.jit, static_argnums=(0, 3), compiler_options=FAST_COMPILE)
def encode(vae, params, video, chunked=True):
    return vae.apply({"params": params}, video, method="encode", chunked=chunked)


@functools.partial(jax.jit, static_argnums=(0, 3), compiler_options=FAST_COMPILE)
def decode(vae, params, latents, chunked=True):
    return vae.apply({"params": params}, latents, method="decode", chunked=chunked)


def reference_vae(name: str, seed: int = 0) -> AutoencoderKLWan:
    """A float32 diffusers VAE with random weights; norm gammas are perturbed away from 1 so
    their conversion is tested too."""
    torch.manual_seed(seed)
    ref = AutoencoderKLWan(**CONFIGS[name]).eval()
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if pname.endswith("gamma"):
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return ref


def state_tensors(ref: AutoencoderKLWan) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}


def to_torch(x) -> torch.Tensor:
    """[B, T, H, W, C] -> torch [B, C, T, H, W]."""
    return torch.from_numpy(np.asarray(x)).permute(0, 4, 1, 2, 3).contiguous()


def from_torch(x: torch.Tensor) -> np.ndarray:
    """torch [B, C, T, H, W] -> [B, T, H, W, C]."""
    return x.detach().permute(0, 2, 3, 4, 1).numpy()


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
