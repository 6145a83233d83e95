"""Data curation (`vdit curate`), Stable Video Diffusion style: raw videos -> clip shards.

  decode.py    streaming decode into bounded segments (frames resized as decoded)
  cuts.py      shot boundaries: PySceneDetect cascade at full and subsampled frame rates
  motion.py    Farneback optical-flow motion score; static / extreme-motion filters
  scores.py    sharpness, brightness, contrast, text overlays, black borders
  learned.py   learned scorers (CLIP similarity, aesthetics) from user-given weights
  captions.py  manifest / sidecar captions and an optional captioning model
  pipeline.py  one segment -> scored, filtered clips (pure computation)
  records.py   the clip shard format (ArrayRecord + msgpack), readable with Grain
  ledger.py    clips-i-of-n.jsonl: resuming, merging into clips.jsonl, the summary
  settings.py  default config path and start-up checks of `config.curate`
  run.py       inputs, sharding across workers, the worker loop, `run_cli`
"""
