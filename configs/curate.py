"""Data curation (`vdit curate`): every threshold and knob of cuts, motion, scores, captions and
the clip shards it writes. Units are named in each key (seconds, fractions, 0..255 luma).

Derive variants by changing a few fields, e.g. a stricter high-quality pass:
  vdit curate ... --config.curate.motion.min_motion=0.01 --config.curate.scores.min_sharpness=80.0
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.curate = ml_collections.ConfigDict(dict(
        # A folder input is searched recursively for files with these suffixes.
        input=dict(extensions=(".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")),
        # Decoding: frames are decoded once, resized on the fly, in segments of bounded length
        # (a long video is processed segment by segment, so memory stays bounded).
        decode=dict(
            short_side=0,  # downscale frames so min(H, W) <= this (0 = native size)
            max_segment_seconds=300.0,  # longer videos are cut into segments of this length
            max_segment_mb=4096.0,  # ... or of fewer frames, when decoded they would pass this
            # (300 s of 1080p is ~56 GB; at 4096: ~23 s of 1080p at 30 fps, ~6 s of 4K; 0 = no bound)
            default_fps=24.0,  # used when the container reports no frame rate
        ),
        # Shot boundaries: PySceneDetect (hard cuts, fades through black) and a multi-scale
        # structure-change detector (transitions of any length; see vdit/curate/gradual.py).
        cuts=dict(
            short_side=128,  # detectors see frames downscaled to this short side
            content_threshold=27.0,  # ContentDetector (full fps): hard-cut candidates
            fade_threshold=12.0,  # ThresholdDetector (full fps): fades through black, 0..255
            fade_rise=0.5,  # a fade's ramp: mean luma (0..255) climbing > this a frame away from a
            # fade's dark frames or a cut
            fade_ramp_drop=0.3,  # ... dimming by at least this fraction of the shot's luma
            fade_ramp_seconds=1.0,  # ... within at most this long (a slowly darkening shot or a
            # pan is not a fade)
            gradual=dict(
                thumb_size=16,  # structure thumbnails are thumb_size x thumb_size x 3
                contrast_floor=4.0,  # 0..255: flatter channels are not normalised up (noise)
                # Time scales (seconds) of the change curve: a transition of up to 2x a scale
                # is seen whole at it (0.8 s: dissolves of 1.6 s), when each shot
                # around it is at least ~3x the scale long.
                scales_seconds=(0.04, 0.1, 0.2, 0.35, 0.55, 0.8),
                min_window=5,  # frames per window at least (medians: flashes of < 3 frames)
                min_change=0.25,  # structure change at a boundary (1 - correlation, 0..~1)
                ratio=2.5,  # ... and this many times the change within the shots on each side
                cut_ratio=1.25,  # the ratio a ContentDetector cut must show to be confirmed
                return_seconds=1.0,  # a scene back within this long was occluded, not cut
                return_change=0.35,  # "back": within this fraction of the boundary's change
                return_ratio=1.5,  # ... or within this many times the shots' own change
                # The view before a change coming back within return_seconds (within
                # return_change of the change), compared on grey views of view_size short side
                # after undoing a shift and one of these zooms, undoes it (A-X-A).
                view_size=64,
                # ... in this many consecutive views (each the best of many alignments: on
                # smooth, low-detail shots one can match two different shots by chance; a scene
                # really back stays back), or in this many pairs of views on its two sides.
                return_views=2,
                return_pairs=2,
                same_distance=0.1,  # ... or the views on its two sides this near: one scene
                # A gradual transition's frames, as found, widened by this fraction of their
                # number on each side (its faintest frames are lost in the shots' own change).
                span_pad=0.25,
                zooms=(1.0, 1.15, 1 / 1.15, 1.3, 1 / 1.3),
                # A peak that the shots' own change hides is judged again with camera motion
                # undone (region by region, on the grey views): it stands at this change
                # (0..~1) and `ratio` times the same measure at aligned_samples places within
                # the shots on each side.
                aligned_change=0.5,
                aligned_samples=4,
                # ... or at blend_change where the frames across it are a blend of its two
                # sides (vdit/curate/blend.py): a dissolve between unrelated pictures of similar
                # colour keeps part of each side's structure in every region (0.3: below, a
                # zoom or pan the alignment missed by a little already reaches it).
                blend_change=0.3,
                # A blend: every frame is a*before + b*after + c to this explained variance
                # (0..1; the suite's dissolves that need it fit at ~0.97, an object crossing at
                # <= 0.45: a shape sweeping over the view is no sum of the two sides) ...
                blend_fit=0.7,
                # ... and somewhere that fit explains this much more of a frame's variance than
                # the better side alone (0..0.5 for two unrelated pictures; a lighting change or
                # a flash is one side re-lit: ~0).
                blend_gain=0.25,
                # Where the shots move (their frames' alpha from the thumbnails spreads beyond
                # motion_spread, 0..1, or the peak was hidden in their change), a change's
                # frames are placed by their correlation with the views on its two sides,
                # camera motion undone, measured at alpha_points frames per scale k on each
                # side (interpolated between).
                motion_spread=0.3,
                alpha_points=4,
            ),
            min_scene_seconds=0.25,  # detectors emit no two cuts closer than this
            merge_seconds=0.25,  # boundaries from different detectors closer than this are one
            min_clip_seconds=1.0,  # shorter clips are dropped ("too_short")
            max_clip_seconds=0.0,  # longer clips are split into equal parts (0 = never)
        ),
        # Motion: Farneback dense optical flow at low resolution on a few frame pairs a second,
        # inside the content box (black bars excluded, as for `scores`). Scores are the mean flow
        # magnitude in content short sides per second (resolution and frame rate independent).
        # Flow reaches ~1/4 of the frame per pair, so the measurable
        # range is up to ~pair_fps / 4 short sides per second.
        motion=dict(
            fps=4.0,  # frame pairs per second of clip
            pair_fps=12.0,  # the two frames of a pair are 1/pair_fps seconds apart
            short_side=64,
            min_motion=0.008,  # below: "static"
            max_motion=1.0,  # above: "extreme_motion"
            pyr_scale=0.5,
            levels=3,
            winsize=9,
            iterations=3,
            poly_n=5,
            poly_sigma=1.1,
        ),
        # Per-clip quality scores, measured on `frames` evenly spaced frames inside the content
        # box (black borders excluded), downscaled to `short_side` when larger.
        scores=dict(
            frames=4,
            short_side=256,
            min_sharpness=3.0,  # variance of the Laplacian of luma (0..255); below: "blurry"
            min_brightness=0.08,  # mean luma / 255; below: "dark"
            max_brightness=0.95,  # above: "bright"
            min_contrast=0.03,  # std of luma / 255; below: "low_contrast"
            # Text overlays: strong edges joined into lines as tall as a character, much wider than
            # tall and dense in edges, centred in the top or bottom band; the score is the share
            # of the frame width they cover.
            text_band=0.25,  # band height, fraction of the frame height
            text_edge=64.0,  # morphological gradient (0..255) counted as a text edge
            text_min_char_height=0.02,  # character height range, fractions of frame height
            text_max_char_height=0.12,
            text_min_aspect=2.5,  # a text line is at least this many times wider than tall
            text_min_fill=0.15,  # share of a line's box that is edge pixels
            max_text=0.25,  # above: "text"
            # Black borders (letterbox / pillarbox): edge rows/columns whose 95th-percentile
            # luma stays <= border_luma in every sampled frame.
            border_luma=20.0,
            max_border=0.5,  # border area fraction above this: "black_border"
            # Learned scorers: weights given by path; empty = skipped with a logged notice.
            clip_model="",  # a transformers CLIPModel folder (with tokenizer and preprocessor)
            aesthetic_head="",  # LAION-style MLP on CLIP image embeddings (.safetensors)
            min_aesthetic=0.0,  # below: "aesthetic" (only when aesthetic_head is given)
            min_clip_score=0.0,  # caption-video cosine similarity; below: "clip_score"
        ),
        captions=dict(
            sidecar=True,  # read VIDEO.json ({"caption"} or {"captions": [{start, end, caption}]})
            # or VIDEO.txt next to each video; a manifest "caption" takes precedence
            captioner="",  # "module:factory"; factory(captioner_arg) -> fn(frames, caption) -> str
            captioner_arg="",  # e.g. a weights folder, passed to the factory
        ),
        output=dict(
            clips_per_file=64,  # kept clips per ArrayRecord part file
            max_file_mb=1024.0,  # or fewer, when their frames pass this size
            crop_borders=True,  # crop detected black borders from the written frames
            short_side=0,  # downscale written frames so min(H, W) <= this (0 = as decoded)
            progress=True,  # tqdm progress bar over this worker's videos
        ),
    ))
    return config
