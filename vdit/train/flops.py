"""FLOPs of a traced program, counted on its jaxpr: matrix multiplies and convolutions (2 FLOPs per
multiply-add), a scan's body times its length. This is what MFU divides by.

XLA's `compiled.cost_analysis()` counts a while loop's body once, so for the DiT, whose blocks run
under `nn.scan`, it reports about 1/num_layers of the block FLOPs (measured: a 12-layer step counted
as ~1/10 of its matmul FLOPs). Elementwise work is left out, as model-FLOPs conventions do; a
remat'd forward that the backward recomputes is counted again (hardware FLOPs). A `while` body
(unknown trip count) counts once; of a `cond`'s branches, the most expensive.
"""

from __future__ import annotations

import math

from jax.extend import core


def jaxpr_flops(jaxpr) -> float:
    """Matmul + convolution FLOPs of a (closed) jaxpr, e.g. `jax.jit(f).trace(*args).jaxpr`."""
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, core.ClosedJaxpr) else jaxpr
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        inner = 0.0
        for value in eqn.params.values():
            if isinstance(value, (core.Jaxpr, core.ClosedJaxpr)):
                inner += jaxpr_flops(value)
            elif isinstance(value, (tuple, list)) and value and all(
                    isinstance(v, (core.Jaxpr, core.ClosedJaxpr)) for v in value):
                inner += max(jaxpr_flops(v) for v in value)  # cond branches: one runs
        total += inner * (int(eqn.params.get("length", 1)) if name == "scan" else 1)
    return total


def _dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    k = math.prod(lhs[d] for d in lhs_contract)
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * k


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    per_output = math.prod(rhs) / rhs[out_feature_dim]  # in-features per group x kernel size
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
