"""Reference AdamW trajectory from optax, the chain tux builds for LWM:
clip_by_global_norm(clip) -> adamw(warmup_cosine_decay_schedule(...), b1, b2, eps, weight_decay),
wrapped in optax.MultiSteps for gradient accumulation. Writes
crates/lwm/tests/fixtures/adamw/trajectory.json for crates/lwm/tests/train_optim.rs.

    /tmp/rajax/bin/python scripts/make_adamw_fixture.py
"""
import json
import pathlib

import numpy as np
import jax.numpy as jnp
import optax

rng = np.random.default_rng(4)
params = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal((5,)).astype(np.float32)}
sched = dict(init_value=1e-4, peak_value=5e-2, warmup_steps=2, decay_steps=6, end_value=5e-3)
cfg = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip=1.0, accumulate=2)
schedule = optax.warmup_cosine_decay_schedule(**sched)
tx = optax.chain(
    optax.clip_by_global_norm(cfg["clip"]),
    optax.adamw(schedule, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"], weight_decay=cfg["weight_decay"]),
)
tx = optax.MultiSteps(tx, cfg["accumulate"])
p = {k: jnp.asarray(v) for k, v in params.items()}
state = tx.init(p)
micro = []
after = []
for i in range(8):  # 8 micro-batches = 4 updates; scale varies so clipping is hit sometimes
    scale = [0.05, 3.0, 0.2, 0.1, 5.0, 0.5, 0.01, 0.3][i]
    g = {k: (rng.standard_normal(v.shape) * scale).astype(np.float32) for k, v in params.items()}
    updates, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
    p = optax.apply_updates(p, updates)
    micro.append({k: v.ravel().tolist() for k, v in g.items()})
    after.append({k: np.asarray(v).ravel().tolist() for k, v in p.items()})
out = dict(
    config=dict(cfg, **sched),
    shapes={k: list(v.shape) for k, v in params.items()},
    init={k: v.ravel().tolist() for k, v in params.items()},
    grads=micro,
    params_after=after,
    schedule_values=[float(schedule(t)) for t in range(10)],
    optax_version=optax.__version__,
)
d = pathlib.Path(__file__).resolve().parent.parent / "crates/lwm/tests/fixtures/adamw"
d.mkdir(parents=True, exist_ok=True)
(d / "trajectory.json").write_text(json.dumps(out))
print("wrote", d / "trajectory.json")
