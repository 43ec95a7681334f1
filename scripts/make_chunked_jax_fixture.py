"""Re-save the tiny LWM text checkpoint with flax's chunked-array form forced on.

flax stores arrays over MAX_CHUNK_SIZE (2^30 bytes) as a map of flat chunks; real 7B files
hit this for w1/w2/w3. The tiny fixture never does, so this lowers the limit to 4096 bytes
(the real flax.serialization code does the chunking) and writes records the way tux's
StreamingCheckpointer does: msgpack.Packer().pack((key_path, flax.serialization.to_bytes(x))).

Needs: pip install "numpy<2" flax==0.8.4 jax==0.4.29 jaxlib==0.4.29
Usage: python scripts/make_chunked_jax_fixture.py IN.msgpack OUT.msgpack
"""
import sys

import flax.serialization as fs
import msgpack

src, dst = sys.argv[1], sys.argv[2]
records = []
with open(src, "rb") as f:
    for key, value in msgpack.Unpacker(f, max_buffer_size=0):
        records.append((tuple(key), fs.msgpack_restore(value)))
fs.MAX_CHUNK_SIZE = 4096
packer = msgpack.Packer()
chunked = 0
with open(dst, "wb") as f:
    for key, arr in records:
        data = fs.to_bytes(arr)
        chunked += data[:1] != b"\xc7" and data[:1] != b"\xc8" and data[:1] != b"\xc9"
        f.write(packer.pack((key, data)))
print(f"{len(records)} records, {chunked} chunked")
