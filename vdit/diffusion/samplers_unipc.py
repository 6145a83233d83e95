"""UniPC (B(h) variant, data prediction) over flow sigmas: per-step coefficients and the JAX update.

The update rule is diffusers' `UniPCMultistepScheduler` with prediction_type="flow_prediction",
use_flow_sigmas=True, predict_x0=True. With alpha = 1 - sigma and lambda = log(alpha / sigma):
every step converts the velocity into a data prediction m = x - sigma v, corrects the current
sample with UniC (using m, skipped on the first step and on `disable_corrector` steps), then
predicts the next sample with UniP from the last `order` data predictions.

All coefficients depend only on the schedule, so they are computed once on the host in float64
(from the float32 sigmas diffusers uses) and fed to the compiled loop as [M]-tables, M = the number
of steps run. The carry holds the sample, the corrected sample before the last prediction, and
the last K = solver_order data predictions (oldest first).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from vdit.diffusion.samplers_config import SamplerSpec


def _log_snr(sigma: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(1.0 - sigma) - np.log(sigma)


def _bh_solve(lam_t, lam_s0, lam_prev, solver_type: str, corrector: bool):
    """UniPC's B(h) system for one update: -> (h phi_1, B(h), r_k [order-1], rhos).

    lam_prev: log-SNRs of the older data predictions used (k = 1 .. order-1, newest first).
    The predictor uses rhos for the order-1 differences; the corrector one more (for m_t).
    """
    order = len(lam_prev) + 1
    h = lam_t - lam_s0
    rks = np.array([(lam - lam_s0) / h for lam in lam_prev] + [1.0])
    hh = -h   # data prediction integrates in -lambda
    h_phi_1 = np.expm1(hh)
    b_h = hh if solver_type == "bh1" else np.expm1(hh)
    h_phi_k, factorial, b = h_phi_1 / hh - 1.0, 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    r_mat = np.stack([rks ** (i - 1) for i in range(1, order + 1)])
    b = np.array(b)
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(r_mat, b)
    elif order == 1:
        rhos = np.zeros(0)
    else:
        rhos = np.array([0.5]) if order == 2 else np.linalg.solve(r_mat[:-1, :-1], b[:-1])
    return h_phi_1, b_h, rks[:-1], rhos


def _update(sig, lam, t_idx: int, s0_idx: int, prev_idx: list[int], k_hist: int,
            solver_type: str, corrector: bool):
    """Coefficients of one UniP/UniC update from sigma[s0_idx] to sigma[t_idx].

    -> (ratio, c_m0, c_b, w [k_hist - 1], rho_t): x_new = ratio x - c_m0 m0
    - c_b (sum_j w[j] (hist[j] - m0) + rho_t (m_t - m0)), hist indexed oldest first.
    """
    if sig[t_idx] == sig[s0_idx]:
        # A zero-length step (final_sigmas_type="sigma_min" repeats the last sigma): identity,
        # which is what diffusers' formulas reduce to where they stay finite.
        return 1.0, 0.0, 0.0, np.zeros(k_hist - 1), 0.0
    h_phi_1, b_h, rks, rhos = _bh_solve(lam[t_idx], lam[s0_idx], [lam[i] for i in prev_idx],
                                        solver_type, corrector)
    alpha_t = 1.0 - sig[t_idx]
    w = np.zeros(k_hist - 1)
    for k, (rho, rk) in enumerate(zip(rhos, rks), start=1):
        w[k_hist - 1 - k] = rho / rk   # hist[-1 - k] is the k-th older prediction
    rho_t = rhos[-1] if corrector else 0.0
    # B(h) is only needed when there is a difference term (keeps inf * 0 out at sigma = 0).
    c_b = alpha_t * b_h if (corrector or len(rhos)) else 0.0
    return sig[t_idx] / sig[s0_idx], alpha_t * h_phi_1, c_b, w, rho_t


def step_orders(spec: SamplerSpec, num_steps: int, start: int) -> list[int]:
    """UniP order of each step run: warm-up from 1 and, with lower_order_final, fewer at the end."""
    orders = []
    for j, i in enumerate(range(start, num_steps)):
        cap = min(spec.solver_order, num_steps - i) if spec.lower_order_final else spec.solver_order
        orders.append(min(cap, j + 1))
    return orders


def unipc_tables(spec: SamplerSpec, sigmas: np.ndarray, start: int) -> dict[str, np.ndarray]:
    """sigmas [N + 1] float32 -> float32 coefficient tables for steps start .. N-1 (M = N - start).

    Keys: sigma [M], use_c [M] (bool), c_ratio/c_m0/c_b/c_rho [M], c_w [M, K-1],
    p_ratio/p_m0/p_b [M], p_w [M, K-1], with K = solver_order.
    """
    num_steps = len(sigmas) - 1
    sig = sigmas.astype(np.float64)
    lam = _log_snr(sig)
    k_hist, orders = spec.solver_order, step_orders(spec, num_steps, start)
    rows = {name: [] for name in ("use_c", "c_ratio", "c_m0", "c_b", "c_w", "c_rho",
                                  "p_ratio", "p_m0", "p_b", "p_w")}
    for j, i in enumerate(range(start, num_steps)):
        use_c = j > 0 and (i - 1) not in spec.disable_corrector
        corr = (_update(sig, lam, i, i - 1, [i - 1 - k for k in range(1, orders[j - 1])], k_hist,
                        spec.solver_type, corrector=True) if use_c
                else (0.0, 0.0, 0.0, np.zeros(k_hist - 1), 0.0))
        pred = _update(sig, lam, i + 1, i, [i - k for k in range(1, orders[j])], k_hist,
                       spec.solver_type, corrector=False)
        rows["use_c"].append(use_c)
        for name, value in zip(("c_ratio", "c_m0", "c_b", "c_w", "c_rho"), corr):
            rows[name].append(value)
        for name, value in zip(("p_ratio", "p_m0", "p_b", "p_w"), pred[:4]):
            rows[name].append(value)
    tables = {name: np.asarray(value, np.float32) for name, value in rows.items()
              if name != "use_c"}
    tables["c_w"] = tables["c_w"].reshape(len(orders), k_hist - 1)
    tables["p_w"] = tables["p_w"].reshape(len(orders), k_hist - 1)
    tables["use_c"] = np.asarray(rows["use_c"], bool)
    tables["sigma"] = sigmas[start:num_steps].astype(np.float32)
    return tables


def _weighted_diffs(w: jnp.ndarray, hist: jnp.ndarray, ref: jnp.ndarray) -> jnp.ndarray:
    """sum_j w[j] (hist[j] - ref); w [K-1], hist [K-1, ...] (zero when K = 1)."""
    if hist.shape[0] == 0:
        return jnp.zeros_like(ref)
    return jnp.tensordot(w, hist - ref[None], axes=1)


def unipc_init(x: jnp.ndarray, solver_order: int):
    """Initial carry: (sample, corrected sample before the last prediction, history [K, ...])."""
    zeros = jnp.zeros_like(x)   # zeros_like keeps x's sharding for the whole carry
    return x, zeros, jnp.stack([zeros] * solver_order)


def unipc_update(carry, v: jnp.ndarray, tab: dict[str, jnp.ndarray]):
    """One step given the velocity v at carry's sample; `tab` holds this step's table entries."""
    x, last, hist = carry
    m = x - tab["sigma"] * v
    prev = hist[-1]
    corrected = tab["c_ratio"] * last - tab["c_m0"] * prev - tab["c_b"] * (
        _weighted_diffs(tab["c_w"], hist[:-1], prev) + tab["c_rho"] * (m - prev))
    x = jnp.where(tab["use_c"], corrected, x)
    hist = jnp.concatenate([hist[1:], m[None]], axis=0)
    new = tab["p_ratio"] * x - tab["p_m0"] * m - tab["p_b"] * _weighted_diffs(
        tab["p_w"], hist[:-1], m)
    return new, x, hist
