"""Wan2.1-T2V-1.3B distilled to a 4-step student (window by window onto its own deterministic
sampler from the guided teacher ODE, guidance baked in; vdit/distill/objective.py, method
"window"), as a rank-64 LoRA on the frozen teacher: the adapter is the few-step model, like the
popular 4-step Wan LoRAs. A step runs the student's rollout (3 calls, no gradient), the teacher
across one window (`teacher_substeps` Euler steps of cond + uncond: 8 calls) and the student with
its backward. `--config.distill.method=continuous` (sCM/rCM's `jax.jvp` tangent through the DiT)
or `discrete` (one teacher step of `delta` back) train the consistency objectives instead, at
about 4 calls a step.

    vdit encode  --config configs/wan2_1_t2v_1_3b_distill.py --workdir runs/wan_distill
    vdit distill --config configs/wan2_1_t2v_1_3b_distill.py --workdir runs/wan_distill \
        --config.distill.teacher=runs/wan2_1_t2v_1_3b
    vdit sample  --workdir runs/wan_distill --prompt "a corgi surfing a wave" --out corgi.mp4

The teacher is a converted Wan2.1 run (`vdit convert --from diffusers`, see
configs/wan2_1_t2v_1_3b.py). Wan's shards carry token ids (`data.text_format` = "ids"): the
UMT5 encoder runs frozen in the step, for the captions and the teacher's empty negative prompt.
"""

import ml_collections

from . import wan2_1_t2v_1_3b


def get_config() -> ml_collections.ConfigDict:
    config = wan2_1_t2v_1_3b.get_config()
    config.distill = ml_collections.ConfigDict(dict(
        teacher="runs/wan2_1_t2v_1_3b", teacher_weights="ema", method="window",
        teacher_substeps=4, window_start="student", delta=0.02, guidance=5.0,
        tangent_warmup=1000, weight_eps=1e-3))
    config.lora.update(dict(enabled=True, rank=64, alpha=64.0))
    config.data.update(dict(caption_dropout=0.0, rows_per_batch=16))
    config.train.update(dict(steps=4000, ema_decay=0.999, i2v_rate=0.0))
    config.optim.update(dict(lr=1e-4, warmup_steps=100, weight_decay=0.0))
    config.checkpoint.update(dict(every=500))
    config.sample.update(dict(steps=4, guidance=1.0))
    config.sample.scheduler = ml_collections.ConfigDict(dict(  # replaced, not merged into UniPC's
        _class_name="ConsistencySampler", flow_shift=config.sample.scheduler.flow_shift,
        gamma=0.0))
    return config
