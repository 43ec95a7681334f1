#!/usr/bin/env python3
"""Reference results of ggml's own CPU kernels, for crates/lwm/tests/ggml_kernels.rs.

Loads the shared libraries of a llama.cpp build (scripts/build-llama-cpp.sh) with ctypes and,
for each weight format, records:

* `weights`: rows of random f32 weights quantized by `ggml_quantize_chunk` (the bytes a GGUF
  file holds for that type);
* `dequant`: the type's `to_float` of those bytes (f32 bits);
* `acts`: activation rows (f32), `acts_q`: the activation blocks ggml's x86 build makes of
  them (`from_float` of the format's `vec_dot_type`: Q8_0 or Q8_K);
* `dots`: `vec_dot` of every weight row with every activation row (f32 bits), the number
  llama.cpp's mul_mat computes for one output element when it does not repack the weights.

The CPU features of the build matter for `vec_dot` (AVX2 and AVX-512 builds may sum in a
different order): the machine's flags are recorded beside the results.

    python3 scripts/ggml_kernel_fixture.py --lib-dir ~/.cache/lwm-peer/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin \\
        > crates/lwm/tests/fixtures/ggml_kernels.json
"""
from __future__ import annotations

import argparse
import ctypes as C
import json
import os
import sys
from pathlib import Path

import numpy as np

# ggml_type ids (ggml.h)
TYPES = {"q4_0": 2, "q5_0": 6, "q8_0": 8, "q4_k": 12, "q5_k": 13, "q6_k": 14}


class TypeTraits(C.Structure):
    _fields_ = [
        ("type_name", C.c_char_p),
        ("blck_size", C.c_int64),
        ("blck_size_interleave", C.c_int64),
        ("type_size", C.c_size_t),
        ("is_quantized", C.c_bool),
        ("to_float", C.c_void_p),
        ("from_float_ref", C.c_void_p),
    ]


class TypeTraitsCpu(C.Structure):
    _fields_ = [
        ("from_float", C.c_void_p),
        ("vec_dot", C.c_void_p),
        ("vec_dot_type", C.c_int),
        ("nrows", C.c_int64),
    ]


TO_FLOAT = C.CFUNCTYPE(None, C.c_void_p, C.POINTER(C.c_float), C.c_int64)
FROM_FLOAT = C.CFUNCTYPE(None, C.POINTER(C.c_float), C.c_void_p, C.c_int64)
# void vec_dot(int n, float *s, size_t bs, const void *x, size_t bx, const void *y, size_t by, int nrc)
VEC_DOT = C.CFUNCTYPE(
    None, C.c_int, C.POINTER(C.c_float), C.c_size_t, C.c_void_p, C.c_size_t, C.c_void_p, C.c_size_t, C.c_int
)


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":")[1].split() if f.startswith(("avx", "f16c", "fma")))
    except OSError:
        pass
    return []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib-dir", required=True, help="folder with libggml-base.so and libggml-cpu.so")
    ap.add_argument("--rows", type=int, default=3)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=20261203)
    args = ap.parse_args()

    lib_dir = Path(args.lib_dir)
    mode = C.RTLD_GLOBAL
    base = C.CDLL(str(lib_dir / "libggml-base.so"), mode=mode)
    cpu = C.CDLL(str(lib_dir / "libggml-cpu.so"), mode=mode)
    base.ggml_get_type_traits.restype = C.POINTER(TypeTraits)
    base.ggml_get_type_traits.argtypes = [C.c_int]
    base.ggml_quantize_chunk.restype = C.c_size_t
    base.ggml_quantize_chunk.argtypes = [
        C.c_int, C.POINTER(C.c_float), C.c_void_p, C.c_int64, C.c_int64, C.c_int64, C.c_void_p
    ]
    base.ggml_quantize_init.argtypes = [C.c_int]
    cpu.ggml_get_type_traits_cpu.restype = C.POINTER(TypeTraitsCpu)
    cpu.ggml_get_type_traits_cpu.argtypes = [C.c_int]
    cpu.ggml_cpu_init()

    rng = np.random.default_rng(args.seed)
    rows, cols = args.rows, args.cols
    # Weights as a trained model's: mostly small, a few larger per block (K-quants' scales
    # and mins then vary), one row with a wide range.
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    w[:, ::37] *= 6.0
    w[-1] *= np.linspace(0.1, 4.0, cols, dtype=np.float32)
    # Activations: normal, one with outliers (as after RMSNorm in real models), one all zero
    # but for one block, one with a negative extreme.
    acts = rng.standard_normal((4, cols)).astype(np.float32)
    acts[1, 5] = 40.0
    acts[1, 700 % cols] = -25.0
    acts[2] = 0.0
    acts[2, 300:320] = rng.standard_normal(20).astype(np.float32)
    acts[3] *= 0.001
    acts[3, 9] = -3.0

    out = {
        "generator": "scripts/ggml_kernel_fixture.py",
        "cpu_flags": cpu_flags(),
        "rows": rows,
        "cols": cols,
        "acts": [[float(v) for v in r] for r in acts],
        "types": {},
    }
    for name, t in TYPES.items():
        tr = base.ggml_get_type_traits(t).contents
        trc = cpu.ggml_get_type_traits_cpu(t).contents
        if cols % tr.blck_size:
            continue  # (K-quants need a multiple of 256 columns)
        base.ggml_quantize_init(t)
        row_bytes = cols // tr.blck_size * tr.type_size
        wq = (C.c_uint8 * (rows * row_bytes))()
        n = base.ggml_quantize_chunk(t, w.ctypes.data_as(C.POINTER(C.c_float)), wq, 0, rows, cols, None)
        assert n == rows * row_bytes, (name, n, rows * row_bytes)
        to_float = TO_FLOAT(tr.to_float)
        deq = np.zeros((rows, cols), dtype=np.float32)
        for r in range(rows):
            to_float(C.addressof(wq) + r * row_bytes, deq[r].ctypes.data_as(C.POINTER(C.c_float)), cols)
        vt = trc.vec_dot_type
        vtr = base.ggml_get_type_traits(vt).contents
        vtrc = cpu.ggml_get_type_traits_cpu(vt).contents
        act_bytes = cols // vtr.blck_size * vtr.type_size
        aq = (C.c_uint8 * (len(acts) * act_bytes))()
        from_float = FROM_FLOAT(vtrc.from_float)
        for a in range(len(acts)):
            from_float(acts[a].ctypes.data_as(C.POINTER(C.c_float)), C.addressof(aq) + a * act_bytes, cols)
        vec_dot = VEC_DOT(trc.vec_dot)
        dots = []
        for r in range(rows):
            row = []
            for a in range(len(acts)):
                s = C.c_float(0.0)
                vec_dot(cols, C.byref(s), 0, C.addressof(wq) + r * row_bytes, 0, C.addressof(aq) + a * act_bytes, 0, 1)
                row.append(int(np.float32(s.value).view(np.uint32)))
            dots.append(row)
        out["types"][name] = {
            "ggml_type": t,
            "vec_dot_type": base.ggml_get_type_traits(vt).contents.type_name.decode(),
            "weights": bytes(wq).hex(),
            "dequant": [[int(v) for v in r.view(np.uint32)] for r in deq],
            "acts_q": [bytes(aq)[a * act_bytes:(a + 1) * act_bytes].hex() for a in range(len(acts))],
            "dots": dots,
        }
        print(f"{name}: {row_bytes} bytes a row, vec_dot_type {out['types'][name]['vec_dot_type']}", file=sys.stderr)
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
