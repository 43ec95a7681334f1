"""The original's JAX training step on CPU, timed: the peer of `lwm train-bench`.

Builds LWM's own `FlaxLLaMAForCausalLMModule` (lwm/llama.py: blockwise attention through
the `ringattention` kernels under `shard_map`, blockwise MLP, scanned layers) on the fixed
model of `lwm train-bench` (vocabulary 259, hidden 256, FFN 512, 2 layers, 4 heads of 64,
theta 1e4) and runs the training step of lwm/train.py (text modality): forward, tux's
`cross_entropy_loss_and_accuracy`, `jax.value_and_grad`, and `TrainState.apply_gradients`
with tux's `OptimizerFactory` AdamW (clip 1.0 → adamw b2 0.95, wd 1e-4, warmup-cosine),
jitted with the train state donated, inside `with mesh:` (mesh_dim 1,1,1,1). Batch 1 of
random byte tokens, loss on every token. Two warm-up steps (compiles), then `--steps`
timed steps; each length runs in its own process, so peak RSS is per length.

Nothing of LWM is copied here: the code is imported from a checkout of
LargeWorldModel/LWM (commit f45d2b7 was used) and of haoliuhl/tux (61c11e1), given as
paths. Environment used (the fixtures' versions, /work/shared/fixtures/lwm-jax/README.md):

    python3 -m venv /tmp/jaxpeer && /tmp/jaxpeer/bin/pip install "jax[cpu]==0.4.29" \
        jaxlib==0.4.29 flax==0.8.4 optax==0.2.2 numpy==1.26.4 transformers==4.40.0 \
        ml_collections einops ringattention==0.1.2 sentencepiece absl-py cloudpickle \
        gcsfs wandb

One thread: `--threads 1` sets XLA_FLAGS=--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1 in the child processes (XLA's CPU backend then runs its ops
on the calling thread); the JSON reports process CPU seconds per step, so the thread use
can be checked (cpu_s / step_s ≈ 1).

Usage: train_peer_jax.py --lwm PATH/TO/LWM --tux PATH/TO/tux [--lengths 512,1024]
       [--steps 2] [--dtype fp32|bf16] [--chunk 256] [--threads 1] [--json OUT.json]
"""
import argparse
import json
import os
import subprocess
import sys
import time


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lwm", required=True, help="LWM checkout (holds lwm/llama.py)")
    p.add_argument("--tux", help="tux checkout (holds tux/); default: an installed tux")
    p.add_argument("--lengths", default="512,1024,2048,4096,8192")
    p.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up")
    p.add_argument("--dtype", default="fp32", help="LWM's --dtype: fp32 or bf16")
    p.add_argument("--chunk", type=int, default=256,
                   help="scan_query/key/mlp_chunk_size (lwm train-bench --chunk)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=259)
    p.add_argument("--threads", type=int, default=1, help="1: single-threaded XLA; 0: XLA default")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per length")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    return p.parse_args()


def single_thread_env(env):
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false "
                        "intra_op_parallelism_threads=1").strip()
    return env


def measure(a, seq_len):
    """One length in this process: compile + warm-up step, then timed steps."""
    sys.path.insert(0, os.path.abspath(a.lwm))
    if a.tux:
        sys.path.insert(0, os.path.abspath(a.tux))
    import resource

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax.training.train_state import TrainState
    from lwm.llama import FlaxLLaMAForCausalLMModule, LLaMAConfig
    from tux import (JaxRNG, OptimizerFactory, cross_entropy_loss_and_accuracy,
                     get_float_dtype_by_name, get_mask, global_norm)

    config = LLaMAConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=2 * a.hidden,
        num_hidden_layers=a.layers, num_attention_heads=a.heads,
        max_sequence_length=seq_len, rms_norm_eps=1e-6, theta=10000,
        scan_attention=True, scan_mlp=True, scan_query_chunk_size=a.chunk,
        scan_key_chunk_size=a.chunk, scan_mlp_chunk_size=a.chunk, scan_layers=True,
        mesh_dim="1,1,1,1", bos_token_id=1, eos_token_id=2,
    )
    mesh = LLaMAConfig.get_jax_mesh(config.mesh_dim)
    model = FlaxLLaMAForCausalLMModule(config, dtype=get_float_dtype_by_name(a.dtype))
    # tux's defaults (train.py's --optimizer flags left at their defaults).
    optimizer, info = OptimizerFactory.get_optimizer(
        OptimizerFactory.get_default_config(),
        get_mask(LLaMAConfig.get_weight_decay_exclusions()), None)

    def init_fn(rng):
        params = model.init(
            input_ids=jnp.zeros((1, seq_len), dtype=jnp.int32),
            position_ids=jnp.zeros((1, seq_len), dtype=jnp.int32),
            attention_mask=jnp.ones((1, seq_len), dtype=jnp.int32),
            rngs=JaxRNG(rng)(LLaMAConfig.rng_keys()),
        )
        return TrainState.create(params=params, tx=optimizer, apply_fn=None)

    # lwm/train.py's train_step, text modality.
    def train_step(train_state, rng, batch):
        rng_generator = JaxRNG(rng)

        def loss_and_accuracy(params):
            logits = model.apply(
                params, batch["input_tokens"], deterministic=False,
                rngs=rng_generator(LLaMAConfig.rng_keys()),
            ).logits
            loss, acc = cross_entropy_loss_and_accuracy(
                logits, batch["target_tokens"], batch["loss_masks"])
            return loss, dict(acc=acc)

        grad_fn = jax.value_and_grad(loss_and_accuracy, has_aux=True)
        (loss, metrics), grads = grad_fn(train_state.params)
        train_state = train_state.apply_gradients(grads=grads)
        metrics = dict(loss=loss, learning_rate=info["learning_rate_schedule"](train_state.step),
                       param_norm=global_norm(train_state.params),
                       gradient_norm=global_norm(grads), **metrics)
        return train_state, rng_generator(), metrics

    rng = np.random.default_rng(9)
    tokens = rng.integers(3, a.vocab, size=(1, seq_len + 1), dtype=np.int32)
    batch = dict(input_tokens=jnp.asarray(tokens[:, :-1]),
                 target_tokens=jnp.asarray(tokens[:, 1:]),
                 loss_masks=jnp.ones((1, seq_len), dtype=jnp.float32))
    with mesh:
        state = jax.jit(init_fn)(jax.random.PRNGKey(0))
        step = jax.jit(train_step, donate_argnums=(0, 1))
        key = jax.random.PRNGKey(1)
        # Two warm-up steps: the first compiles for init's output, the second once more for
        # the step's own (donated) output; from then on every call reuses that executable.
        warmup_s = []
        for _ in range(2):
            t0 = time.perf_counter()
            state, key, m = step(state, key, batch)
            jax.block_until_ready(m)
            warmup_s.append(time.perf_counter() - t0)
            if len(warmup_s) == 1:
                first_loss = float(m["loss"])
        times, cpu = [], []
        for _ in range(max(1, a.steps)):
            t0, c0 = time.perf_counter(), time.process_time()
            state, key, m = step(state, key, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    times_sorted = sorted(times)
    median = times_sorted[len(times) // 2]
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    return dict(
        impl="lwm-jax", seq_len=seq_len, dtype=a.dtype, chunk=a.chunk,
        tokens_per_s=seq_len / median, step_s_min=times_sorted[0], step_s_max=times_sorted[-1],
        cpu_s_per_step=sorted(cpu)[len(cpu) // 2], warmup_s=warmup_s,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        params=int(n_params), loss_first=first_loss, loss_last=float(m["loss"]),
        jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
        backend=jax.default_backend(),
    )


def run_length(a, seq_len):
    """Measure one length in a child process; returns its JSON or an error record."""
    env = dict(os.environ)
    if a.threads == 1:
        single_thread_env(env)
    cmd = [sys.executable, os.path.abspath(__file__), "--lwm", a.lwm, "--one", str(seq_len),
           "--steps", str(a.steps), "--dtype", a.dtype, "--chunk", str(a.chunk),
           "--hidden", str(a.hidden), "--layers", str(a.layers), "--heads", str(a.heads),
           "--vocab", str(a.vocab), "--threads", str(a.threads)]
    if a.tux:
        cmd += ["--tux", a.tux]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return dict(impl="lwm-jax", seq_len=seq_len, error=f"over {a.timeout:.0f} s")
    if out.returncode != 0:
        return dict(impl="lwm-jax", seq_len=seq_len,
                    error=f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    a = parse()
    if a.one:
        print(json.dumps(measure(a, a.one)))
        return
    results = []
    print(f"{'seq_len':>8} {'tokens/s':>10} {'step s':>8} {'cpu s':>8} {'RSS MiB':>8}")
    for n in [int(x) for x in a.lengths.split(",")]:
        r = run_length(a, n)
        results.append(r)
        if "error" in r:
            print(f"{n:>8} {r['error']}")
            continue
        print(f"{n:>8} {r['tokens_per_s']:>10.0f} {n / r['tokens_per_s']:>8.3f} "
              f"{r['cpu_s_per_step']:>8.3f} {r['peak_rss_mib']:>8.0f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
