#!/usr/bin/env python3
# Makes the GGUF golden files that tests/io/gguf_golden_test.cpp compares qlora against.
#
# Made with: Python 3.11.7, gguf 0.19.0 (gguf-py, from llama.cpp), numpy 2.4.6.
#   python3 -m venv /tmp/gguf-venv && /tmp/gguf-venv/bin/pip install gguf==0.19.0 numpy==2.4.6
#   /tmp/gguf-venv/bin/python tests/golden/make_gguf_golden.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]
#
# Writes, under tests/golden/:
#   gguf/<type>.gguf and gguf/<type>.f32: for each ggml type that qlora dequantizes, a small
#       GGUF file written by gguf-py with one tensor "weight" of random but valid blocks, and
#       the little-endian float32 values that gguf-py's dequantizer returns for it, row-major
#       [rows, cols];
#   gguf/metadata.gguf: one metadata entry of each of the 13 GGUF value types, nested arrays
#       included, written by gguf-py (the test knows the values);
#   smollm2_q4_1_dequant.json: for every tensor of the SmolLM2 GGUF, a hash of gguf-py's
#       dequantized float32 values (see tensor_hash), their float64 sum and max |x|, and the
#       bit patterns of the values at 32 seeded positions. Skipped without --model.
import argparse
import hashlib
import json
import pathlib
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter, GGUFValueType
from gguf.quants import dequantize

HERE = pathlib.Path(__file__).resolve().parent
SEED = 20241204
N_SAMPLES = 32

# (type, rows, cols): two or more blocks per row, a few KB per file.
SYNTHETIC = [
    (T.F32, 3, 40),
    (T.F16, 3, 40),
    (T.BF16, 3, 40),
    (T.Q8_0, 4, 96),
    (T.Q4_0, 4, 96),
    (T.Q4_1, 4, 96),
    (T.Q5_0, 4, 96),
    (T.Q5_1, 4, 96),
    (T.Q4_K, 3, 512),
    (T.Q5_K, 3, 512),
    (T.Q6_K, 3, 512),
]

# Byte offsets of the fp16 fields inside one block of each quantized type (ggml-common.h).
FP16_FIELDS = {
    T.Q8_0: [0],
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}


def random_finite_fp16(rng, n):
    """Random fp16 bit patterns that are finite: zeros, subnormals and normals of both signs."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint32).astype(np.uint16)
    exponent = (bits >> 10) & 0x1F
    bits[exponent == 0x1F] &= np.uint16(0xBFFF)  # clear the top exponent bit: finite again
    return bits


def random_blocks(rng, qtype, rows, cols):
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint16).astype(np.uint8)
    for offset in FP16_FIELDS[qtype]:
        scale = random_finite_fp16(rng, n_blocks)
        # Keep most scales in a realistic range so the products stay far from overflow, but
        # leave a few raw patterns (subnormals, large values) in.
        tame = rng.random(n_blocks) < 0.8
        scale[tame] = (rng.standard_normal(tame.sum()) * 0.05).astype(np.float16).view(np.uint16)
        scale[0] = 0  # a zero scale
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(rows, cols // block_size * type_size)


def make_synthetic(out_dir, rng):
    out_dir.mkdir(parents=True, exist_ok=True)
    for qtype, rows, cols in SYNTHETIC:
        name = qtype.name.lower()
        path = out_dir / f"{name}.gguf"
        writer = GGUFWriter(str(path), arch="llama")
        if qtype == T.F32:
            writer.add_tensor("weight", rng.standard_normal((rows, cols)).astype(np.float32))
        elif qtype == T.F16:
            values = rng.standard_normal((rows, cols)).astype(np.float16)
            values[0, :4] = np.array([0.0, -0.0, 6.0e-8, 65504.0], dtype=np.float16)
            writer.add_tensor("weight", values)
        elif qtype == T.BF16:
            bits = (rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16)
            writer.add_tensor("weight", bits.astype(np.uint16).view(np.uint8).reshape(rows, cols * 2),
                              raw_dtype=T.BF16)
        else:
            writer.add_tensor("weight", random_blocks(rng, qtype, rows, cols), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

        reader = GGUFReader(str(path))
        tensor = reader.tensors[0]
        assert tensor.tensor_type == qtype, (tensor.tensor_type, qtype)
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        values = values.reshape(rows, cols)
        assert np.isfinite(values).all()
        values.astype("<f4").tofile(out_dir / f"{name}.f32")
        print(f"{path.name}: {path.stat().st_size} bytes, [{rows}, {cols}]")


def make_metadata(out_dir):
    path = out_dir / "metadata.gguf"
    writer = GGUFWriter(str(path), arch="test")
    writer.add_uint8("test.uint8", 200)
    writer.add_int8("test.int8", -100)
    writer.add_uint16("test.uint16", 60000)
    writer.add_int16("test.int16", -30000)
    writer.add_uint32("test.uint32", 4000000000)
    writer.add_int32("test.int32", -2000000000)
    writer.add_float32("test.float32", 0.1)
    writer.add_bool("test.bool", True)
    writer.add_string("test.string", "héllo GGUF")
    writer.add_uint64("test.uint64", 18000000000000000000)
    writer.add_int64("test.int64", -9000000000000000000)
    writer.add_float64("test.float64", 0.1)
    writer.add_array("test.array_string", ["a", "bc", ""])
    writer.add_key_value("test.array_uint64", [1, 2, 3], GGUFValueType.ARRAY, GGUFValueType.UINT64)
    writer.add_key_value("test.array_nested", [[1, 2], [3]], GGUFValueType.ARRAY)
    writer.add_key_value("test.array_float32", [0.5, -1.5], GGUFValueType.ARRAY,
                         GGUFValueType.FLOAT32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"{path.name}: {path.stat().st_size} bytes")


MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def tensor_hash(values):
    """Order-sensitive 64-bit hash of float32 values: the sum modulo 2^64 over i of
    splitmix64_finalizer(bits(values[i]) * 0x9E3779B97F4A7C15 + i). tests/io reimplements it."""
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1).view(np.uint32)
    total = np.uint64(0)
    chunk = 1 << 22
    with np.errstate(over="ignore"):
        for start in range(0, flat.size, chunk):
            bits = flat[start : start + chunk].astype(np.uint64)
            x = bits * GOLDEN + np.arange(start, start + bits.size, dtype=np.uint64)
            x ^= x >> np.uint64(30)
            x *= MIX1
            x ^= x >> np.uint64(27)
            x *= MIX2
            x ^= x >> np.uint64(31)
            total += np.sum(x, dtype=np.uint64)
    return int(total)


def make_model_golden(model_path, out_path):
    data = model_path.read_bytes()
    reader = GGUFReader(str(model_path))
    rng = np.random.default_rng(SEED)
    entries = []
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        cols = int(tensor.shape[0])
        rows = int(np.prod(tensor.shape[1:])) if len(tensor.shape) > 1 else 1
        values = values.reshape(rows, cols)
        flat = values.reshape(-1)
        index = np.sort(rng.choice(flat.size, size=min(N_SAMPLES, flat.size), replace=False))
        entries.append({
            "name": tensor.name,
            "type": tensor.tensor_type.name,
            "shape": [rows, cols],
            "hash": f"{tensor_hash(values):016x}",
            "sum": float(np.sum(flat, dtype=np.float64)),
            "absmax": float(np.max(np.abs(flat))),
            "sample_index": [int(i) for i in index],
            "sample_bits": [int(b) for b in flat[index].view(np.uint32)],
        })
    golden = {
        "made_by": "tests/golden/make_gguf_golden.py",
        "gguf_py_version": gguf_version(),
        "numpy_version": np.__version__,
        "model_file": model_path.name,
        "model_size": len(data),
        "model_sha256": hashlib.sha256(data).hexdigest(),
        "tensors": entries,
    }
    out_path.write_text(json.dumps(golden, separators=(",", ":")) + "\n")
    print(f"{out_path.name}: {len(entries)} tensors, {out_path.stat().st_size} bytes")


def gguf_version():
    from importlib.metadata import version
    return version("gguf")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=pathlib.Path, help="the SmolLM2 Q4_1 GGUF (scripts/fetch-model)")
    args = parser.parse_args()
    rng = np.random.default_rng(SEED)
    make_synthetic(HERE / "gguf", rng)
    make_metadata(HERE / "gguf")
    if args.model:
        make_model_golden(args.model, HERE / "smollm2_q4_1_dequant.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
