"""Wan2.1 weights in diffusers/transformers layout <-> vdit (module, params), both directions.

The public entry points of DESIGN.md section 4. Each model family's tensor mapping lives in its own
file (`wan_vae.py`, `wan_dit.py`, `wan_text.py`); this module is the one place users import from.
"""

from vdit.convert.wan_dit import load_transformer, save_transformer
from vdit.convert.wan_image import load_image_encoder, read_image_processor, save_image_encoder
from vdit.convert.wan_text import load_text_encoder, save_text_encoder
from vdit.convert.wan_vae import load_vae, save_vae

__all__ = ["load_image_encoder", "load_text_encoder", "load_transformer", "load_vae",
           "read_image_processor", "save_image_encoder", "save_text_encoder", "save_transformer",
           "save_vae"]
