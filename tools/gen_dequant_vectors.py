#!/usr/bin/env python3
"""Write dequantization test vectors for kiln from the gguf Python package.

Rerun (from the repository root):

    pip install gguf==0.19.0 numpy
    python3 tools/gen_dequant_vectors.py

It writes tests/data/dequant/<TYPE>.bin for each of the 14 types kiln
dequantizes; tests/dequant_vectors.rs checks kiln's CPU dequantization against
them bit for bit. The output is deterministic (seeded RNG), so rerunning with
the same gguf/numpy versions reproduces the committed files.

File layout (all little-endian):

    offset  size       field
    0       4          magic b"KDQ1"
    4       4          u32 GGML type id (must match the file name)
    8       4          u32 n_elems: number of dequantized values
    12      4          u32 n_bytes: number of raw block bytes
    16      n_bytes    raw blocks, exactly as stored in a GGUF tensor
    16+n_bytes 4*n_elems  f32 values from gguf.quants.dequantize(raw, type)

Block contents are random bytes, except the f16 scale fields (d, dmin, m),
which are random finite f16 values: normals of both signs over the whole
finite range, zeros of both signs and subnormals. F32/F16/BF16 values are
random finite values plus a few specials (signed zeros, subnormals,
infinities, quiet and signaling NaNs with payloads), whose bits gguf keeps.
"""

from __future__ import annotations

import struct
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

SEED = 0x6B696C6E  # "kiln"
MAGIC = b"KDQ1"

# Blocks per quantized type: enough to cover every scale/bit pattern path.
BLOCKS_SMALL = 256  # 32-element block types
BLOCKS_K = 64  # 256-element (K-quant) types
N_PLAIN = 4096  # elements for F32 / F16 / BF16

# Byte offsets of the f16 scale fields inside one block.
SCALE_OFFSETS: dict[T, tuple[int, ...]] = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.IQ4_NL: (0,),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}

PLAIN = (T.F32, T.F16, T.BF16)


def random_finite_f16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random finite f16 bit patterns: mostly normals of either sign, with
    about 1/8 zeros (+0/-0) and 1/8 subnormals."""
    sign = rng.integers(0, 2, n, dtype=np.uint16) << np.uint16(15)
    exp = rng.integers(1, 31, n, dtype=np.uint16)  # 1..30: finite normals
    man = rng.integers(0, 1024, n, dtype=np.uint16)
    kind = rng.integers(0, 8, n)
    exp = np.where(kind <= 1, 0, exp).astype(np.uint16)  # zero or subnormal
    man = np.where(kind == 0, 0, man).astype(np.uint16)  # zero
    man = np.where((kind == 1) & (man == 0), 1, man).astype(np.uint16)  # subnormal
    return sign | (exp << np.uint16(10)) | man


def quant_blocks(rng: np.random.Generator, qtype: T, n_blocks: int) -> np.ndarray:
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    # A few fixed patterns: all-zero and all-ones payloads.
    blocks[0, :] = 0x00
    blocks[1, :] = 0xFF
    for off in SCALE_OFFSETS[qtype]:
        bits = random_finite_f16_bits(rng, n_blocks)
        bits[0] = 0x3C00  # 1.0
        bits[1] = 0xBC00  # -1.0
        blocks[:, off : off + 2] = bits.astype("<u2").view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


def plain_values(rng: np.random.Generator, qtype: T) -> np.ndarray:
    if qtype == T.F32:
        vals = rng.standard_normal(N_PLAIN).astype(np.float32)
        vals *= np.exp2(rng.integers(-140, 120, N_PLAIN)).astype(np.float32)  # wide range incl. subnormals
        bits = vals.view(np.uint32).copy()
        specials = [0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x7F800000, 0xFF800000,
                    0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FA5A5A5, 0x7F7FFFFF, 0xFF7FFFFF]
        bits[: len(specials)] = specials
        return bits.astype("<u4").view(np.uint8)
    if qtype == T.F16:
        bits = random_finite_f16_bits(rng, N_PLAIN)
        specials = [0x0000, 0x8000, 0x0001, 0x83FF, 0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x7C01, 0x7D55,
                    0x7BFF, 0xFBFF]
        bits[: len(specials)] = specials
        return bits.astype("<u2").view(np.uint8)
    if qtype == T.BF16:
        f32 = rng.standard_normal(N_PLAIN).astype(np.float32)
        f32 *= np.exp2(rng.integers(-140, 120, N_PLAIN)).astype(np.float32)
        bits = (f32.view(np.uint32) >> np.uint32(16)).astype(np.uint16)
        specials = [0x0000, 0x8000, 0x0001, 0x807F, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81, 0x7FA5,
                    0x7F7F, 0xFF7F]
        bits[: len(specials)] = specials
        return bits.astype("<u2").view(np.uint8)
    raise ValueError(qtype)


def main() -> int:
    gguf_version = metadata.version("gguf")
    print(f"gguf {gguf_version}, numpy {np.__version__}")
    if gguf_version != "0.19.0":
        print("warning: the vectors were made with gguf 0.19.0", file=sys.stderr)
    root = Path(__file__).resolve().parent.parent
    out_dir = root / "tests" / "data" / "dequant"
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)

    types = list(PLAIN) + list(SCALE_OFFSETS)
    assert len(types) == 14
    total = 0
    for qtype in types:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if qtype in PLAIN:
            raw = plain_values(rng, qtype)
        else:
            n_blocks = BLOCKS_K if block_size == 256 else BLOCKS_SMALL
            raw = quant_blocks(rng, qtype, n_blocks)
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        with np.errstate(all="ignore"):
            values = gguf.quants.dequantize(raw.copy(), qtype)
        values = np.asarray(values, dtype=np.float32).reshape(-1)
        n_elems = raw.size // type_size * block_size
        assert values.size == n_elems, (qtype.name, values.size, n_elems)

        path = out_dir / f"{qtype.name}.bin"
        data = (
            MAGIC
            + struct.pack("<III", int(qtype), n_elems, raw.size)
            + raw.tobytes()
            + values.astype("<f4").tobytes()
        )
        path.write_bytes(data)
        total += len(data)
        n_nan = int(np.isnan(values).sum())
        print(f"{path.relative_to(root)}: {n_elems} elems, {raw.size} bytes, {n_nan} NaN")
    print(f"total {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
