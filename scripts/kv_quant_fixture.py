"""Reference bytes of KV-cache element types from the `gguf` Python package (ggml's
reference quantizers in numpy), for crates/lwm/tests/kv_types.rs.

    python3 scripts/kv_quant_fixture.py > crates/lwm/tests/fixtures/kv_quant_gguf.json
"""
import json

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize

rng = np.random.default_rng(20261124)
# 8 blocks of 32 with varied scales, one all-zero block, one with a lone negative extreme.
x = rng.standard_normal((8, 32)).astype(np.float32) * np.array(
    [0.01, 0.5, 1.0, 3.0, 10.0, 0.0, 2.0, 100.0], dtype=np.float32
)[:, None]
x[6, 5] = -9.0
# +0.0, not the -0.0 that negative normals times 0 give: ggml's C quantizer starts from
# max = +0.0 (scale -0.0) whatever the zeros' signs, numpy's argmax picks the first zero.
x[5, :] = 0.0
x = x.reshape(-1).astype(np.float32)
out = {"values": [float(v) for v in x]}
for name, t in [("f16", T.F16), ("bf16", T.BF16), ("q8_0", T.Q8_0), ("q4_0", T.Q4_0)]:
    out[name] = bytes(quantize(x.reshape(1, -1), t).tobytes()).hex()
print(json.dumps(out))
