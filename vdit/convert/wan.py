"""Wan2.1 weights in diffusers/transformers layout <-> vdit (module, params), both directions.

The public entry points of DESIGN.md section 4. Each model family's tensor mapping lives in its own
file (`wan_vae.py`, `wan_dit.py`, `wan_text.py`); this module is the one place users import from.
"""
