"""Generation: text-to-video and image-to-video with a flow sampler and classifier-free guidance
over the DiT, then the VAE's chunked decode. Video-to-video (restyle, extend, interpolate,
upscale) builds on `Generator.sample` in `vdit/pipelines/video_to_video.py`.

    gen = Generator.from_workdir("runs/dit")            # a vdit run (DiT + its VAE + text encoder)
    gen = Generator.from_diffusers(path)                # a diffusers Wan pipeline folder
    latents = gen.text_to_video(context, negative_context, noise, steps=4, guidance=5.0,
                                output="latent")   # context [B, L, D_txt]; noise [B,T',H',W',C]
    video = gen.image_to_video(image, context, negative_context, noise)   # image [B, H, W, 3]
    video = gen.generate(["a red circle moving right"], frames=9, height=32, width=32, seed=0)

Latents handed to and returned by the sampler are normalised ((z - mean) / std, per channel); the
VAE decodes z = latents * std + mean. The sampling loop compiles once per shape and step count.
Image-to-video uses the model's I2V input channels and CLIP image tokens when it has them (Wan2.1
I2V, exactly as diffusers' WanImageToVideoPipeline) and otherwise pins the known latent frames
(see `vdit/pipelines/conditioning.py`). Text-to-video on an I2V-capable model without a CLIP image
branch (vdit runs trained with `train.i2v_rate`) feeds mask 0 and condition 0, as training does.
Wan2.2: a TI2V model (`expand_timesteps`) does image-to-video with the image's clean latent as
frame 0 at timestep 0; a two-expert A14B model (`dit_2`, `boundary`) denoises steps with timestep
>= boundary with `dit` (guidance `guidance`) and the rest with `dit_2` (`guidance_2`).
Micro-conditioned models (`config.model.micro_conditioning`) sample with the values of
`gen.with_micro(fps=..., motion=...)` (fps defaults to the run's `data.fps`, motion to
`sample.motion` when the config has it); `generate(..., fps=, motion=)` is a shortcut.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdit.config import check_frames
from vdit.convert import diffusers_folder as folder_lib
from vdit.convert import wan_lora
from vdit.data.conditions import condition_latents
from vdit.diffusion.samplers import Sampler
from vdit.diffusion.samplers_schedule import check_num_steps
from vdit.models import micro as micro_lib
from vdit.models.image import penultimate_features
from vdit.models.image_preprocess import preprocess, to_uint8
from vdit.models.text import encode_prompts
from vdit.models.vae import denormalize_latents, normalize_latents
from vdit.pipelines import conditioning as cond_lib
from vdit.pipelines import run_parts
from vdit.pipelines.guided_dit import GuidedDiT, TwoExperts
from vdit.train.init_from import resolve, run_weights


@dataclasses.dataclass
class Generator:
    dit: Any
    dit_params: Any
    vae: Any
    vae_params: Any
    sampler: Sampler
    latents_mean: np.ndarray
    latents_std: np.ndarray
    text_model: Any = None
    text_params: Any = None
    tokenizer: Any = None
    mask_text: bool = False
    defaults: dict = dataclasses.field(default_factory=lambda: {"steps": 30, "guidance": 5.0})
    image_encoder: Any = None
    image_encoder_params: Any = None
    image_processor: Any = None
    micro: dict = dataclasses.field(default_factory=dict)  # micro-conditioning values to sample with
    # Wan2.2 A14B: the low-noise expert (same latent layout as `dit`) and the timestep below which
    # it denoises (boundary_ratio * num_train_timesteps); `dit` is then the high-noise expert.
    dit_2: Any = None
    dit_2_params: Any = None
    boundary: float | None = None
    # Wan2.2 TI2V: image-to-video puts the image's clean latent in frame 0 at timestep 0.
    expand_timesteps: bool = False
    # An image-to-video pipeline folder (Wan2.2 I2V-A14B has I2V channels but no CLIP branch): it
    # was never trained without an image, so text-to-video's zero condition is refused.
    image_only: bool = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_workdir(cls, workdir: str, which: str = "ema", dtype: str | None = None
                     ) -> Generator:
        """A trained vdit run (its latest step; or a checkpoint step folder
        `<run>/checkpoints/<step>`, that step): its DiT (EMA weights), text encoder, VAE and
        latent statistics. `dtype` (None: the run's config) replaces the DiT's and text
        encoder's compute dtype and holds their weights in it."""
        # Complete weights: frozen parts from the run's init_from (or seed), LoRA merged.
        params, saved = run_weights(workdir, which)
        run, _ = resolve(workdir)  # the run folder locates its latents (statistics)
        config = ml_collections.ConfigDict(saved)
        if dtype is not None:
            config.model.dtype = dtype
            if "dtype" in config.text:
                config.text.dtype = dtype
            if config.get("image_encoder", {}).get("image_encoder_path"):
                config.image_encoder.dtype = dtype  # a converted Wan2.1 I2V run's CLIP
            params = folder_lib.cast_run_weights(params, dtype)
        return cls.from_params(config, params, run)

    @classmethod
    def from_params(cls, config: ml_collections.ConfigDict, params: dict,
                    workdir: str) -> Generator:
        """A vdit run's model from its config and complete weights {"dit", "text"} in memory
        (host or device arrays, e.g. the EMA during training), with the VAE of
        `config.encode.vae_workdir` and the latent statistics of the run's latents folder
        (`workdir` locates the default one)."""
        return cls(**run_parts.load_parts(config, params, workdir))

    @classmethod
    def from_diffusers(cls, path: str, dtype: str = "float32",
                       attention: str = "auto") -> Generator:
        """A diffusers Wan pipeline folder (see `vdit/convert/diffusers_folder.py`); `attention`:
        the DiTs' backend (default: the platform's kernel, as a converted run's)."""
        return cls(**folder_lib.load_parts(path, dtype=dtype, attention=attention))

    # ------------------------------------------------------------------ model facts
    @property
    def temporal_factor(self) -> int:
        return self.vae.temporal_factor

    @property
    def condition_channels(self) -> int:
        """Extra DiT input channels for I2V conditioning (mask + latents), 0 for text-to-video."""
        extra = self.dit.in_channels - self.vae.z_dim
        if extra not in (0, self.temporal_factor + self.vae.z_dim):
            raise ValueError(f"transformer in_channels={self.dit.in_channels} fits neither "
                             f"text-to-video (z_dim={self.vae.z_dim}) nor Wan I2V (2 * z_dim + "
                             f"{self.temporal_factor} mask channels)")
        return extra

    # ------------------------------------------------------------------ pieces
    def encode_text(self, prompts: list[str]) -> tuple[jax.Array, jax.Array]:
        """Prompts -> (context [B, L, D], mask [B, L]) with Wan's zeroed padding."""
        if self.text_model is None:
            raise ValueError("this Generator has no text encoder: pass context embeddings")
        context = encode_prompts(self.text_model, self.text_params, self.tokenizer, prompts)
        _, mask = self.tokenizer(list(prompts))
        return context, jnp.asarray(mask, jnp.int32)

    def encode_video(self, video) -> jax.Array:
        """Video [B, 1+4k, H, W, 3] in [-1, 1] -> normalised latents (the posterior mean).

        The VAE is causal (latent frame j sees pixel frames <= 4j), so callers that need the
        latents of a clip's first frames encode them inside a canvas of the output's length: the
        same compiled encoder serves every workflow of one video shape."""
        mean = _encode(self.vae, self.vae_params, cond_lib.pixels("video", video))
        return normalize_latents(mean, self.latents_mean, self.latents_std)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Normalised latents [B, T', H', W', C] -> video [B, T, H, W, 3] in [-1, 1]."""
        z = denormalize_latents(latents, self.latents_mean, self.latents_std)
        return _decode(self.vae, self.vae_params, z)

    def image_tokens(self, images) -> jax.Array:
        """Images [B, H, W, 3] in [-1, 1] -> CLIP penultimate features [B, N, D_img]."""
        if self.image_encoder is None:
            raise ValueError("this model conditions on CLIP image features but the Generator has "
                             "no image encoder (a pipeline folder without image_encoder/): pass "
                             "image_embeds")
        pixels = preprocess(to_uint8(np.asarray(images)), self.image_processor)
        return penultimate_features(self.image_encoder, self.image_encoder_params, pixels)

    def condition_from_frames(self, video, known) -> jax.Array:
        """Wan I2V conditioning: video [B, T, H, W, 3] whose frames flagged in `known` [T] are
        given (the rest are zeroed) -> [B, T', H', W', tf + z] = concat(mask, latents)."""
        return condition_latents(video, known, self.encode_video, self.temporal_factor)

    def with_micro(self, fps: float | None = None, motion: float | None = None) -> Generator:
        """A copy sampling with these micro-conditioning values (fps: frames per second; motion:
        frame short sides per second); a value the model does not take is an error."""
        given = micro_lib.check_given(self.dit.micro_conditioning, {"fps": fps, "motion": motion})
        return dataclasses.replace(self, micro=self.micro | given)

    def with_lora(self, path: str, strength: float = 1.0, expert: str = "high",
                  donate: bool = False) -> Generator:
        """A copy whose DiT has the LoRA file at `path` merged in at `strength` (diffusers' or
        the original Wan format, vdit/convert/wan_lora.py). `expert` "low" adapts a Wan2.2
        two-expert model's low-noise DiT (`dit_2`); "high" adapts `dit`, the only one of a
        one-expert model. `donate` frees each replaced weight on the device as it goes (this
        Generator's DiT is then unusable), so a model that fits loads with its LoRA too."""
        if expert not in ("high", "low"):
            raise ValueError(f"expert {expert!r}: expected 'high' or 'low'")
        if expert == "low" and self.dit_2 is None:
            raise ValueError(f"--lora-2 {path}: this model has one DiT (no low-noise expert); "
                             "give its LoRA with --lora")
        dit = "dit_2" if expert == "low" else "dit"
        merged = wan_lora.merge_lora_file(getattr(self, dit), getattr(self, f"{dit}_params"),
                                          path, strength, donate)
        return dataclasses.replace(self, **{f"{dit}_params": merged})

    def _micro_inputs(self, batch: int) -> dict | None:
        names = self.dit.micro_conditioning
        if not names:
            return None
        values = micro_lib.sampling_values(names, self.micro, self.defaults)
        return {k: jnp.full((batch,), v, jnp.float32) for k, v in values.items()}

    # ------------------------------------------------------------------ sampling
    def sample(self, noise, context, negative_context, steps: int | None = None,
               guidance: float | None = None, output: str = "video", *, context_mask=None,
               negative_mask=None, start_step: int | None = None, init_latents=None,
               condition=None, image_context=None, pin=None, guidance_2: float | None = None,
               first_frame=None):
        """The one sampling path every workflow uses.

        noise [B, T', H', W', C]; context [B, L, D_txt] (negative_context may be None when
        guidance == 1). start_step skips the first steps: with `init_latents` (clean normalised
        latents) they are noised to that step with `noise` (SDEdit), else `noise` is taken as the
        already-noised latents. condition [B, T', H', W', tf + z]: Wan I2V channels.
        image_context [B, N, D_img]: CLIP tokens for models with an image branch.
        pin = (known [B, T', H', W', C], mask [B, T', 1, 1, 1]): latent frames kept fixed.
        guidance_2: the low-noise expert's guidance (two-expert models; default: the run's
        `sample.guidance_2` when `guidance` is its default too, else `guidance`).
        As in diffusers' Wan pipelines, guidance <= 1 turns classifier-free guidance off for
        every expert (guidance_2 included; a warning says so when that changes a value).
        first_frame [B, 1, H', W', C]: a clean normalised latent the model sees in frame 0 at
        timestep 0 (Wan2.2 TI2V image-to-video); the result's frame 0 is set to it.
        """
        if output not in ("latent", "video"):
            raise ValueError(f"output={output!r}; expected 'latent' or 'video'")
        steps = check_num_steps(self.defaults["steps"] if steps is None else steps)
        guidance, guidance_2 = self.guidance_scales(guidance, guidance_2)
        x = self._check_noise(noise)
        b = x.shape[0]
        for name, ctx in (("context", context), ("negative_context", negative_context)):
            if ctx is not None and (ctx.ndim != 3 or ctx.shape[0] != b):
                raise ValueError(f"{name} must be [B={b}, L, D_txt], got {tuple(ctx.shape)}")
        if condition is None and self.condition_channels and not self.dit.has_image_branch:
            if self.image_only:
                raise ValueError("this is an image-to-video model (a WanImageToVideoPipeline "
                                 "folder): give an image (image_to_video, or vdit sample --image)")
            condition = jnp.zeros(x.shape[:-1] + (self.condition_channels,))  # text-to-video
        self._check_condition(condition, image_context, x.shape)
        micro = self._micro_inputs(b)
        start = 0 if start_step is None else start_step
        if init_latents is not None:
            x = self.sampler.add_noise(init_latents, x, steps, start_step=start)
        ones = lambda c: jnp.ones(c.shape[:2], jnp.int32)
        cond = (context, ones(context) if context_mask is None else context_mask,
                condition, image_context, micro)
        uncond = None
        if negative_context is not None:
            uncond = (negative_context,
                      ones(negative_context) if negative_mask is None else negative_mask,
                      condition, image_context, micro)
        if first_frame is not None:
            first_frame = jnp.asarray(first_frame, jnp.float32)
            if first_frame.shape != (b, 1) + x.shape[2:]:
                raise ValueError(f"first_frame must be [B, 1, H', W', C] = {(b, 1) + x.shape[2:]}, "
                                 f"got {tuple(first_frame.shape)}")
        velocity, params = self._velocity(guidance, guidance_2, first_frame is not None)
        extra = () if first_frame is None else (first_frame,)
        args = (params, *extra, cond, uncond)
        if pin is not None:
            if start and init_latents is None:
                raise ValueError("pin with start_step > 0 needs init_latents: the pinned frames "
                                 "are noised with `noise`, which must then be pure noise")
            pin = (jnp.asarray(pin[0], jnp.float32), jnp.asarray(pin[1], jnp.float32),
                   jnp.asarray(noise, jnp.float32))
            x = cond_lib.pin_start(x, pin, float(self.sampler.schedule(steps)[0][start]))
            velocity, args = cond_lib.PinnedVelocity(velocity), (pin,) + args
        latents = self.sampler.sample(velocity, x, steps, *args, start_step=start)
        if pin is not None:
            latents = cond_lib.apply_pins(latents, pin)
        if first_frame is not None:
            latents = latents.at[:, :1].set(first_frame)
        return latents if output == "latent" else self.decode(latents)

    def guidance_scales(self, guidance: float | None,
                        guidance_2: float | None) -> tuple[float, float | None]:
        """(guidance, guidance_2) as `sample` applies them: None takes the run's settings, both
        experts' (Wan2.2 A14B: 4.0 high, 3.0 low); guidance <= 1 is (1.0, None): guidance off
        for every expert, warned when that drops a value. Resolved values map to themselves."""
        if guidance is None:
            guidance = float(self.defaults["guidance"])
            if guidance_2 is None and self.dit_2 is not None:
                guidance_2 = self.defaults.get("guidance_2")
        guidance = float(guidance)
        if guidance > 1.0:
            return guidance, guidance_2
        if guidance < 1.0 or guidance_2 not in (None, 1.0):
            warnings.warn(f"guidance={guidance:g} <= 1 turns classifier-free guidance off (as "
                          f"diffusers' Wan pipelines do); guidance_2={guidance_2} is ignored",
                          stacklevel=3)
        return 1.0, None

    def _velocity(self, guidance: float, guidance_2: float | None, clean_first: bool):
        """(velocity_fn, its params): one guided DiT, or the two experts switched by timestep."""
        def guided(dit, scale):
            v = GuidedDiT(dit, scale, self.mask_text)
            return cond_lib.CleanFirstFrame(v, tuple(dit.patch_size)) if clean_first else v

        if self.dit_2 is None:
            if guidance_2 is not None:
                raise ValueError(f"guidance_2={guidance_2} needs a two-expert model (a pipeline "
                                 "folder with transformer_2/ and boundary_ratio)")
            return guided(self.dit, guidance), self.dit_params
        scale_2 = guidance if guidance_2 is None else float(guidance_2)
        velocity = TwoExperts(guided(self.dit, guidance), guided(self.dit_2, scale_2),
                              float(self.boundary))
        return velocity, (self.dit_params, self.dit_2_params)

    def _check_noise(self, noise) -> jax.Array:
        x = jnp.asarray(noise, jnp.float32)
        if x.ndim != 5 or x.shape[-1] != self.vae.z_dim:
            raise ValueError(f"noise must be latents [B, T', H', W', C={self.vae.z_dim}], got "
                             f"shape {tuple(x.shape)}")
        return x

    def _check_condition(self, condition, image_context, shape) -> None:
        channels = self.condition_channels
        if channels and condition is None:
            raise ValueError(f"this image-to-video model takes {channels} conditioning channels: "
                             "use image_to_video (or pass condition=)")
        if condition is not None and tuple(condition.shape) != tuple(shape[:-1]) + (channels,):
            raise ValueError(f"condition has shape {tuple(condition.shape)}, expected "
                             f"{tuple(shape[:-1]) + (channels,)}")
        if self.dit.has_image_branch and image_context is None:
            raise ValueError("this model has an image branch: pass image_context (CLIP tokens)")

    # ------------------------------------------------------------------ workflows
    def text_to_video(self, context, negative_context, noise, steps: int | None = None,
                      guidance: float | None = None, output: str = "video",
                      context_mask=None, negative_mask=None, start_step: int | None = None,
                      guidance_2: float | None = None):
        """Samples from `noise` [B, T', H', W', C] (normalised latent space) given text
        embeddings; returns latents (output="latent") or decoded video [B, T, H, W, 3].
        guidance_2: the low-noise expert's scale (two-expert models; default as in `sample`)."""
        return self.sample(noise, context, negative_context, steps, guidance, output,
                           context_mask=context_mask, negative_mask=negative_mask,
                           start_step=start_step, guidance_2=guidance_2)

    def image_to_video(self, image, context, negative_context, noise, steps: int | None = None,
                       guidance: float | None = None, output: str = "video", *,
                       context_mask=None, negative_mask=None, last_image=None,
                       image_embeds=None, guidance_2: float | None = None):
        """First frame `image` [B, H, W, 3] in [-1, 1] (H, W the video size that `noise`
        implies) -> video whose frame 0 is that image; with `last_image`, also its last frame
        (first-last-frame interpolation). `image_embeds` [B, N, D_img] replaces the CLIP pass."""
        x = self._check_noise(noise)
        frames = 1 + self.temporal_factor * (x.shape[1] - 1)
        first = self._check_images("image", image, x.shape)
        last = None if last_image is None else self._check_images("last_image", last_image,
                                                                  x.shape)
        if last is not None and frames == 1:  # both would be frame 0: one would vanish unsaid
            raise ValueError("last_image with a 1-frame noise (1 latent frame): first-last-frame "
                             "interpolation needs at least 5 frames (2 latent frames); drop "
                             "last_image or use longer noise")
        kw = dict(context_mask=context_mask, negative_mask=negative_mask, guidance_2=guidance_2)
        if self.expand_timesteps and not self.condition_channels:
            if last is not None:
                raise ValueError("last_image: a TI2V model (expand_timesteps) conditions on the "
                                 "first frame only")
            # the image alone is encoded (one latent frame), as diffusers' TI2V pipeline does
            kw["first_frame"] = self.encode_video(first[:, None])
            return self.sample(x, context, negative_context, steps, guidance, output, **kw)
        if self.condition_channels:
            video = jnp.zeros((x.shape[0], frames) + first.shape[1:], jnp.float32)
            video = video.at[:, 0].set(first)
            if last is not None:
                video = video.at[:, -1].set(last)
            known = cond_lib.known_pixel_frames(frames, 1, 0 if last is None else 1)
            kw |= self.i2v_inputs(video, known, first, last, image_embeds)
            return self.sample(x, context, negative_context, steps, guidance, output, **kw)
        # One full-length encode: the causal VAE's latent frame 0 sees frame 0 alone, and the
        # last latent frame of [first, last, last, ...] is the last image held still.
        fill = jnp.zeros_like(first) if last is None else last
        guide = jnp.concatenate([first[:, None], jnp.repeat(fill[:, None], frames - 1, 1)], 1)
        encoded = self.encode_video(guide)
        pinned = [0] if last is None else [0, x.shape[1] - 1]
        mask = cond_lib.latent_frame_mask(x.shape[0], x.shape[1], pinned)
        known = encoded * mask
        return self.sample(x, context, negative_context, steps, guidance, output,
                           pin=(known, mask), **kw)

    def _check_images(self, name, images, latent_shape) -> jax.Array:
        f = self.vae.spatial_factor
        want = (latent_shape[0], latent_shape[2] * f, latent_shape[3] * f, 3)
        images = cond_lib.pixels(name, images)
        if tuple(images.shape) != want:
            raise ValueError(f"{name} must be [B, H, W, 3] = {want} (the noise's batch and "
                             f"size), got {tuple(images.shape)}; resize/crop it first")
        return images

    def i2v_inputs(self, video, known, first, last=None, image_embeds=None) -> dict:
        """`sample` keywords for a Wan I2V model: `condition` from the `known` [T] frames of
        video [B, T, H, W, 3], and (image-branch models) `image_context` from CLIP on `first`
        (and `last` for first-last-frame models) unless `image_embeds` is given."""
        out = {"condition": self.condition_from_frames(video, known)}
        if self.dit.has_image_branch:
            out["image_context"] = self._image_context(first, last, image_embeds)
        return out

    def _image_context(self, first, last, image_embeds) -> jax.Array:
        if image_embeds is not None:
            return jnp.asarray(image_embeds, jnp.float32)
        tokens = self.image_tokens(first)
        if self.dit.pos_embed_seq_len:  # first-last-frame models read both images' tokens
            if last is None:
                raise ValueError("this first-last-frame model (pos_embed_seq_len="
                                 f"{self.dit.pos_embed_seq_len}) needs last_image")
            tokens = jnp.concatenate([tokens, self.image_tokens(last)], axis=1)
        return tokens

    def generate(self, prompts: list[str], frames: int, height: int, width: int, seed: int = 0,
                 steps: int | None = None, guidance: float | None = None,
                 negative_prompt: str = "", fps: float | None = None,
                 motion: float | None = None) -> jax.Array:
        """Prompts -> videos [B, frames, height, width, 3] in [-1, 1]. fps / motion: values for a
        micro-conditioned model (an error for a model without that conditioning)."""
        gen = self.with_micro(fps, motion)
        noise = gen.noise(seed, len(prompts), frames, height, width)
        context, mask = gen.encode_text(list(prompts))
        neg, neg_mask = gen.encode_text([negative_prompt] * len(prompts))
        return gen.text_to_video(context, neg, noise, steps, guidance, "video", mask, neg_mask)

    def noise(self, seed: int, batch: int, frames: int, height: int, width: int) -> jax.Array:
        """Standard normal latents [batch, T', H', W', C] from `seed` (reproducible)."""
        shape = (batch, *self.latent_shape(frames, height, width))
        return jax.random.normal(jax.random.key(seed), shape)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return latent_shape(self.vae, self.dit, frames, height, width)


def latent_shape(vae, dit, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """[T', H', W', C] of a frames x height x width clip's latents; sizes the VAE's factors and
    the DiT's patches cannot take are a ValueError naming them."""
    check_frames("--frames", frames)
    f, tf = vae.spatial_factor, vae.temporal_factor
    pt, ph, pw = dit.patch_size
    for name, size, p in (("height", height, ph), ("width", width, pw)):
        if size <= 0 or size % (f * p):
            raise ValueError(f"{name}={size} must be a positive multiple of {f * p} (the "
                             f"VAE's {f}x downsampling times the DiT's patch {p})")
    if ((frames - 1) // tf + 1) % pt:
        raise ValueError(f"frames={frames} gives {(frames - 1) // tf + 1} latent frames, not "
                         f"a multiple of the DiT's temporal patch {pt}")
    return (1 + (frames - 1) // tf, height // f, width // f, vae.z_dim)


@functools.partial(jax.jit, static_argnums=0)
def _decode(vae, params, z):
    return vae.apply({"params": params}, z, method="decode")


@functools.partial(jax.jit, static_argnums=0)
def _encode(vae, params, video):
    return vae.apply({"params": params}, video, method="encode")[0]
