"""vdit's record of a run in the diffusers folder `vdit convert --to diffusers` writes: what the run
samples with that the folder's pipeline class and Wan's defaults do not say.

model_index.json keeps it under the private key "_vdit":
    {"image_only": bool, "mask_text": bool, "defaults": {"steps": 20, "guidance": 3.0, ...}}
  image_only  whether the model does image-to-video only; a shapes run has Wan2.1 I2V's input
              channels (so the folder's class is WanImageToVideoPipeline) but trains text-to-video
              too, which the class alone would refuse;
  mask_text   whether the DiT attends each prompt's real tokens only (packed captions), where Wan's
              pipelines attend the whole zero-padded block;
  defaults    the run's sampling defaults (steps, guidance, frames, size, fps, ...).
diffusers drops "_"-prefixed keys of model_index.json when it builds a pipeline
(ConfigMixin.extract_init_dict), so the folder still loads there; a folder without the key (a
published Wan folder) samples with Wan's defaults, as before.
"""

from __future__ import annotations

KEY = "_vdit"
# from config.sample; guidance_2: a two-expert model's low-noise expert
DEFAULT_KEYS = ("steps", "guidance", "guidance_2", "frames", "height", "width", "motion")
FIELDS = ("image_only", "mask_text", "defaults")


def run_defaults(config) -> dict:
    """The sampling defaults of a run of `config`: `sample`'s DEFAULT_KEYS and `data.fps`."""
    defaults = {k: config.sample[k] for k in DEFAULT_KEYS if k in config.sample}
    if "data" in config and "fps" in config.data:
        defaults["fps"] = float(config.data.fps)
    return defaults


def of_run(config, image_only: bool, mask_text: bool) -> dict:
    """The record of a run of `config` (JSON-ready)."""
    return {"image_only": bool(image_only), "mask_text": bool(mask_text),
            "defaults": run_defaults(config)}


def read(index: dict, where: str) -> dict:
    """model_index.json's record, checked; {} when the folder has none."""
    record = index.get(KEY)
    if record is None:
        return {}
    if not isinstance(record, dict) or set(record) - set(FIELDS):
        raise ValueError(f"{where}: {KEY}={record!r}; expected an object with keys among "
                         f"{list(FIELDS)}")
    for name in ("image_only", "mask_text"):
        if name in record and not isinstance(record[name], bool):
            raise ValueError(f"{where}: {KEY}.{name}={record[name]!r}; expected true or false")
    defaults = record.get("defaults", {})
    allowed = (*DEFAULT_KEYS, "fps")
    if not isinstance(defaults, dict) or set(defaults) - set(allowed) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in defaults.values()):
        raise ValueError(f"{where}: {KEY}.defaults={defaults!r}; expected numbers under keys "
                         f"among {list(allowed)}")
    return record
