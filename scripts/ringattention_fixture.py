#!/usr/bin/env python3
"""Reference outputs of the original's RingAttention (PyPI `ringattention`, JAX) for the
Rust ring tests: random q/k/v, causal mask, optional segment ids, sp=4 virtual CPU devices.

    python3 -m venv /tmp/ringvenv && /tmp/ringvenv/bin/pip install "jax[cpu]" flax ringattention
    /tmp/ringvenv/bin/python scripts/ringattention_fixture.py crates/lwm/tests/fixtures/ringattention.json

The package's __init__ fails on current JAX (jax.lib.xla_bridge is gone), so its
ringattention_jax.py is loaded directly from the installed package directory.
"""
import importlib.util
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental.shard_map import shard_map  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as PS  # noqa: E402

spec = importlib.util.find_spec("ringattention")
path = os.path.join(os.path.dirname(spec.origin), "ringattention_jax.py")
mod_spec = importlib.util.spec_from_file_location("ringattention_jax", path)
ra = importlib.util.module_from_spec(mod_spec)
mod_spec.loader.exec_module(ra)

SP = 4
mesh = Mesh(np.array(jax.devices()[:SP]).reshape(1, 1, 1, SP), ("dp", "fsdp", "tp", "sp"))


def run(q, k, v, segment_ids, q_chunk, k_chunk):
    b, l, h, d = q.shape
    bias = jnp.zeros((b, 1, 1, l), jnp.float32)
    kwargs = dict(
        causal_block_size=1,
        query_chunk_size=q_chunk,
        key_chunk_size=k_chunk,
        deterministic=True,
        dropout_rng=None,
        attn_pdrop=0.0,
        dtype=jnp.float32,
        policy=jax.checkpoint_policies.nothing_saveable,
        precision=None,
        prevent_cse=True,
    )

    def f(q, k, v, bias, seg):
        return ra.ring_attention(q, k, v, bias, seg, None, "sp", True, kwargs)

    seg_spec = PS(("dp", "fsdp"), None)
    fn = shard_map(
        f,
        mesh=mesh,
        in_specs=(PS(("dp", "fsdp"), "sp", "tp", None),) * 3
        + (PS(("dp", "fsdp"), None, None, None), seg_spec),
        out_specs=PS(("dp", "fsdp"), "sp", "tp", None),
        check_rep=False,
    )
    return np.asarray(jax.jit(fn)(q, k, v, bias, segment_ids))


def main(out_path):
    rng = np.random.default_rng(4)
    cases = []
    l, h, d = 64, 2, 16
    for q_chunk, k_chunk, with_segments in [(8, 8, False), (4, 16, False), (16, 4, True)]:
        q, k, v = (rng.standard_normal((1, l, h, d)).astype(np.float32) for _ in range(3))
        if with_segments:
            # Three packed documents; boundaries not aligned to chunks or device shards.
            seg = np.array([[0] * 21 + [1] * 30 + [2] * 13], dtype=np.int32)
        else:
            seg = np.zeros((1, l), dtype=np.int32)
        out = run(q, k, v, seg, q_chunk, k_chunk)
        cases.append(
            dict(
                sp=SP,
                seq_len=l,
                heads=h,
                head_dim=d,
                query_chunk=q_chunk,
                key_chunk=k_chunk,
                segment_ids=seg[0].tolist() if with_segments else None,
                # (seq_len, heads, head_dim) row-major, batch 1.
                q=[float(f"{x:.9g}") for x in q.ravel()],
                k=[float(f"{x:.9g}") for x in k.ravel()],
                v=[float(f"{x:.9g}") for x in v.ravel()],
                out=[float(f"{x:.9g}") for x in out.ravel()],
            )
        )
    meta = dict(
        source="ringattention (PyPI) ringattention_jax.ring_attention under shard_map, sp=4 CPU devices",
        jax=jax.__version__,
        script="scripts/ringattention_fixture.py",
    )
    with open(out_path, "w") as f:
        json.dump(dict(meta=meta, cases=cases), f)


if __name__ == "__main__":
    main(sys.argv[1])
