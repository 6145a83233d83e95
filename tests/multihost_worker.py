"""One process of tests/test_multihost.py: start jax.distributed from the flags, train a few steps.

    python tests/multihost_worker.py --workdir W --steps 3 [--coordinator H:P --num_processes N
        --process_id I] [--config.KEY=VALUE ...]

The caller sets XLA_FLAGS (devices per process) and JAX_PLATFORMS. Prints one JSON line with the
process layout it saw, then exits; the trained state is in W's checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vdit.parallel import distributed  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=3)
    distributed.add_distributed_flags(parser)
    overrides = [a for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    distributed.initialize_from_args(args)

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    from vdit.config import load_config
    from vdit.parallel.mesh import make_hybrid_mesh
    from vdit.train import loop

    config = load_config(os.path.join(ROOT, "configs", "shapes_dit.py"), overrides)
    history = loop.train(config, args.workdir, stop_after=args.steps)
    # A multi-slice mesh with the processes as slices: dcn data axis = one entry per process.
    hybrid = make_hybrid_mesh({"fsdp": -1}, {"data": jax.process_count()})
    slices = [sorted({d.process_index for d in hybrid.devices[i].flat})
              for i in range(hybrid.devices.shape[0])]
    print(json.dumps({"layout": distributed.describe(), "process": jax.process_index(),
                      "processes": jax.process_count(), "devices": jax.device_count(),
                      "losses": [float(h["loss"]) for h in history],
                      "hybrid_shape": list(hybrid.devices.shape), "hybrid_slices": slices}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
