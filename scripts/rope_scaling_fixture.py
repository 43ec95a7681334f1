"""Reference RoPE inverse frequencies for YaRN and Llama-3 scaling, written from the
formulas of Hugging Face transformers' `_compute_yarn_parameters` and
`_compute_llama3_parameters` (modeling_rope_utils.py) in numpy, for crates/lwm/src/rope.rs.

    python3 scripts/rope_scaling_fixture.py > crates/lwm/tests/fixtures/rope_scaling.json
"""
import json
import math

import numpy as np


def yarn(base, dim, factor, original_max, beta_fast=32.0, beta_slow=1.0, attention_factor=None):
    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if attention_factor is None:
        attention_factor = get_mscale(factor)

    def correction_dim(num_rotations):
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return [float(x) for x in inv_freq.astype(np.float64)], float(attention_factor)


def llama3(base, dim, factor, low_freq_factor, high_freq_factor, original_max):
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    low_wavelen = original_max / low_freq_factor
    high_wavelen = original_max / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    out = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    out = np.where(medium, smoothed, out)
    return [float(x) for x in out]


inv, att = yarn(10000.0, 64, 4.0, 2048)
inv2, att2 = yarn(1e6, 128, 16.0, 4096, beta_fast=16.0, beta_slow=2.0)
print(json.dumps({
    "yarn": {"base": 10000.0, "dim": 64, "factor": 4.0, "original_max": 2048,
             "beta_fast": 32.0, "beta_slow": 1.0, "inv_freq": inv, "attention_factor": att},
    "yarn_b": {"base": 1e6, "dim": 128, "factor": 16.0, "original_max": 4096,
               "beta_fast": 16.0, "beta_slow": 2.0, "inv_freq": inv2, "attention_factor": att2},
    "llama3": {"base": 500000.0, "dim": 128, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max": 8192,
               "inv_freq": llama3(500000.0, 128, 8.0, 1.0, 4.0, 8192)},
}))
