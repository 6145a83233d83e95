"""Wan2.1 text-to-video 14B: derived from the 1.3B recipe by its published sizes.

dim 5120 (40 heads x 128), ffn 13824, 40 layers; weights sharded over fsdp (ZeRO-3), full remat.
"""

import importlib.util
import os

import ml_collections


def _sibling(name: str):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"vdit_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config() -> ml_collections.ConfigDict:
    config = _sibling("wan2_1_t2v_1_3b").get_config()
    config.model.num_attention_heads = 40
    config.model.ffn_dim = 13824
    config.model.num_layers = 40
    config.model.remat = "full"
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=1))
    return config
