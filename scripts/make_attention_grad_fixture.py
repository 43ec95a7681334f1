"""Reference outputs and gradients of the original's attention kernel (`ringattention`, PyPI,
the library LWM trains with) for crates/lwm/tests/attention_grad.rs.

Random q, k, v, dout (B=2, L=64, H=2, D=16), causal mask and segment ids (packed documents),
sequence split over a 2-device ring (sp=2, virtual CPU devices) with query/key chunks 8/16.
Writes float32 .npy files (and int32 segment ids) to crates/lwm/tests/fixtures/attention-grad/.

    python -m venv /tmp/rajax && /tmp/rajax/bin/pip install "jax[cpu]" flax ringattention einops
    /tmp/rajax/bin/python scripts/make_attention_grad_fixture.py

`import ringattention` fails on current JAX (its __init__ calls jax.lib.xla_bridge), so the
module file ringattention_jax.py is loaded directly.
"""
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import importlib.util
import pathlib
import sys

import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as PS

spec = importlib.util.find_spec("ringattention")
path = pathlib.Path(spec.submodule_search_locations[0]) / "ringattention_jax.py"
mod_spec = importlib.util.spec_from_file_location("ringattention_jax", path)
ra = importlib.util.module_from_spec(mod_spec)
mod_spec.loader.exec_module(ra)

try:
    from jax import shard_map
except ImportError:
    from jax.experimental.shard_map import shard_map

B, L, H, D = 2, 64, 2, 16
rng = np.random.default_rng(8)
q, k, v, dout = (rng.standard_normal((B, L, H, D)).astype(np.float32) for _ in range(4))
# Documents of 13, 20, 31 tokens in row 0; 40, 24 in row 1 (boundaries inside chunks and
# across the two ring shards).
seg = np.zeros((B, L), np.int32)
seg[0, 13:33] = 1
seg[0, 33:] = 2
seg[1, 40:] = 1

mesh = Mesh(np.array(jax.devices()[:2]), ("sp",))
kwargs = dict(
    causal_block_size=1,
    deterministic=True,
    dropout_rng=None,
    attn_pdrop=0.0,
    query_chunk_size=8,
    key_chunk_size=16,
    dtype=jnp.float32,
    policy=jax.checkpoint_policies.nothing_saveable,
    precision=None,
    prevent_cse=True,
)


# The replication-check flag was renamed (check_rep -> check_vma) across JAX versions.
no_check = {
    ("check_rep" if "check_rep" in shard_map.__code__.co_varnames else "check_vma"): False
}


def attn(q, k, v, seg):
    f = shard_map(
        lambda q, k, v, seg: ra.ring_attention(q, k, v, None, seg, None, "sp", True, kwargs),
        mesh=mesh,
        in_specs=(PS(None, "sp"), PS(None, "sp"), PS(None, "sp"), PS(None, None)),
        out_specs=PS(None, "sp"),
        **no_check,
    )
    return f(q, k, v, seg)


out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, jnp.asarray(seg)), q, k, v)
dq, dk, dv = vjp(jnp.asarray(dout))

# Dense check of the library itself (the fixture must be the right thing).
s = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(D)
allowed = (np.arange(L)[:, None] >= np.arange(L)[None, :])[None, None] & (
    seg[:, None, :, None] == seg[:, None, None, :]
)
s = np.where(allowed, s, -np.inf)
p = np.exp(s - s.max(-1, keepdims=True))
p /= p.sum(-1, keepdims=True)
dense = np.einsum("bhqk,bkhd->bqhd", p, v)
print("ringattention vs dense forward max |diff|", np.abs(np.asarray(out) - dense).max())

outdir = pathlib.Path(__file__).resolve().parent.parent / "crates/lwm/tests/fixtures/attention-grad"
outdir.mkdir(parents=True, exist_ok=True)
for name, arr in dict(q=q, k=k, v=v, dout=dout, out=out, dq=dq, dk=dk, dv=dv).items():
    np.save(outdir / f"{name}.npy", np.asarray(arr, np.float32))
np.save(outdir / "segment_ids.npy", seg.astype(np.uint32))
print("wrote", outdir, "jax", jax.__version__, file=sys.stderr)
