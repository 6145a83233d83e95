"""A 4-step student of a trained shapes DiT (configs/shapes_dit.py), distilled window by window
onto its own deterministic sampler from the teacher's guided ODE, its classifier-free guidance
baked in (vdit/distill/objective.py, method "window", each window starting where the student's
own rollout arrives; README's "Few-step students" compares the methods on the demo's teacher).

    vdit distill --config configs/shapes_distill.py --workdir runs/distill \
        --config.distill.teacher=runs/dit
    vdit sample  --workdir runs/distill --prompt "a red circle moving right" --out fast.mp4

The student starts as the teacher (its EMA) and trains all its weights (`--config.lora.enabled=True`
trains a rank-`lora.rank` adapter instead); the teacher's model, text, VAE and latents come from
its run. It samples with 4 DiT calls and no unconditional pass (`sample.guidance` = 1), where the
teacher takes 20 UniPC steps of two calls each. `make distill` runs it on `make demo`'s teacher.
"""

import ml_collections

from . import shapes_dit


def get_config() -> ml_collections.ConfigDict:
    config = shapes_dit.get_config()
    config.distill = ml_collections.ConfigDict(dict(
        teacher="runs/dit", teacher_weights="ema", method="window", teacher_substeps=4,
        window_start="student",
        delta=0.05, guidance=config.sample.guidance,  # the teacher's CFG scale, baked in
        tangent_warmup=150, weight_eps=1e-3))
    # Text-to-video clips only (the target is the guided text-to-video ODE), every caption kept:
    # the student never needs the unconditional model. A step runs the student's rollout (3 DiT
    # calls, no gradient), the teacher's window (4 Euler steps of cond + uncond: 8 calls) and the
    # student with its backward: 500 steps of 8 rows take `make distill` about 4 minutes on 2 CPU
    # cores (its budget is 15); 1200 steps judged no better.
    config.data.update(dict(rows_per_batch=8, caption_dropout=0.0))
    config.train.update(dict(steps=500, ema_decay=0.98, log_every=25, i2v_rate=0.0,
                             last_frame_rate=0.0))
    config.optim.update(dict(lr=3e-4, warmup_steps=20))
    config.checkpoint.update(dict(every=200, keep=2))
    config.sample.update(dict(steps=4, guidance=1.0))
    config.sample.scheduler = ml_collections.ConfigDict(dict(  # replaced, not merged into UniPC's
        _class_name="ConsistencySampler", flow_shift=config.sample.scheduler.flow_shift,
        gamma=0.0))
    return config
