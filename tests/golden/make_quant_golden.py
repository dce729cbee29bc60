#!/usr/bin/env python3
"""Write the golden files of the quantizer tests (tests/golden/quant/*.json).

Made with (CPU only, Python 3.11.7):
    torch 2.15.0, bitsandbytes 0.50.2, numpy 2.4.6

NF4 comes from bitsandbytes itself:
  * quantize_4bit(quant_type="nf4", compress_statistics=False/True) on CPU, which runs
    bitsandbytes' pure-PyTorch "default" backend for the 4-bit step;
  * the nested 8-bit step of double quantization is bitsandbytes' default-backend
    quantize_blockwise kernel, called through the CompositeExplicitAutograd dispatch key.
    The native CPU library of bitsandbytes 0.50.2 instead encodes through a 65536-bin
    lookup table that missed the nearest map entry for 0.15% of 4096 N(0, 1) values. Each
    file records how many of its codes that path gives differently
    ("native_cpu_absmax_code_mismatches"), for information only. The native path also
    stores 0 where the default backend stores 1e-38 as the absmax of a short, all-zero
    last nested block ("native_cpu_nested_absmax_mismatches"); both decode the same;
  * dequantized values from bitsandbytes' dequantize_4bit on CPU.
INT4 / INT8 use numpy float32 arithmetic with the rule stated in
include/qlora/quant/int_quant.hpp, because no upstream package computes that exact rule
(GPTQ forces the range to contain zero, MLX re-fits the scale, ggml's Q4_1 multiplies by a
reciprocal and rounds half up). The GPTQ cases follow GPTQ-for-LLaMa's quantizer.py formula
(asymmetric, per group, torch.round) written out here in numpy.

Floats are stored as their IEEE-754 bit patterns (uint32) so the C++ test reads them exactly.

Usage: python3 tests/golden/make_quant_golden.py   (from the repository root)
"""

import json
import os

import numpy as np
import torch
import bitsandbytes
import bitsandbytes.functional as F

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quant")
F32 = np.float32


def bits(a):
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.uint32).ravel().tolist()


def write(name, obj):
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, name + ".json")
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")
    print(f"{path}: {os.path.getsize(path)} bytes")


def versions():
    return {"torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
            "numpy": np.__version__}


# ---------------------------------------------------------------------------------------
# Tables


def make_tables():
    write("tables", {
        "source": "bitsandbytes.functional.get_4bit_type('nf4'), create_dynamic_map(signed=True)",
        "versions": versions(),
        "nf4_levels": bits(F.get_4bit_type("nf4", device="cpu").numpy()),
        "dynamic_map": bits(F.create_dynamic_map(signed=True).numpy()),
    })


# ---------------------------------------------------------------------------------------
# NF4


def default_quantize_blockwise(values, code, blocksize):
    """bitsandbytes' reference (default-backend) quantize_blockwise kernel."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return op.redispatch(keys, values, code, blocksize)


def nf4_case(name, weights, blocksize, double_quant, note):
    w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                    compress_statistics=False)
    absmax = state.absmax.clone()
    case = {
        "name": name,
        "note": note,
        "versions": versions(),
        "rows": int(w.shape[0]),
        "cols": int(w.shape[1]),
        "block_size": blocksize,
        "double_quant": double_quant,
        "weights": bits(w.numpy()),
        "codes": packed.reshape(-1).tolist(),
        "absmax": bits(absmax.numpy()),
    }
    if double_quant:
        offset = absmax.mean()
        code = F.create_dynamic_map(signed=True)
        qabsmax, nested = default_quantize_blockwise(absmax - offset, code, 256)
        native_q, native_state = F.quantize_blockwise(absmax - offset, code=code, blocksize=256)
        state2 = F.QuantState(absmax=nested, code=code, blocksize=256, dtype=torch.float32)
        state = F.QuantState(absmax=qabsmax, shape=w.shape, code=F.get_4bit_type("nf4", device="cpu"),
                             blocksize=blocksize, quant_type="nf4", dtype=torch.float32,
                             offset=offset, state2=state2)
        case.update({
            "nested_offset": bits([offset.item()]),
            "absmax_codes": qabsmax.reshape(-1).tolist(),
            "nested_absmax": bits(nested.numpy()),
            "native_cpu_absmax_code_mismatches": int((native_q != qabsmax).sum().item()),
        })
        # Check that bitsandbytes' own compress_statistics=True path agrees on what it shares.
        _, state_dq = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                      compress_statistics=True)
        assert state_dq.offset.item() == offset.item()
        case["native_cpu_nested_absmax_mismatches"] = int(
            (state_dq.state2.absmax != nested).sum().item())
    deq = F.dequantize_4bit(packed, state)
    case["dequantized"] = bits(deq.numpy())
    write("nf4_" + name, case)


def nf4_tie_matrix():
    """Rows whose values land exactly on NF4 thresholds and on levels after scaling."""
    levels = F.get_4bit_type("nf4", device="cpu").numpy().astype(np.float32)
    mids = ((levels[:-1] + levels[1:]) / F32(2)).astype(np.float32)
    row0 = np.zeros(64, np.float32)
    row0[0] = 1.0  # absmax 1, so x * (1 / 1) = x exactly
    row0[1:16] = mids
    row0[16:31] = np.nextafter(mids, np.float32(2))
    row0[31:46] = np.nextafter(mids, np.float32(-2))
    row0[46:62] = levels
    row1 = (row0 * F32(-2.0)).astype(np.float32)  # absmax 2: the reciprocal is still exact
    row2 = np.zeros(64, np.float32)  # an all-zero block
    row3 = np.full(64, F32(0.375), np.float32)  # a constant block
    row4 = (np.random.default_rng(5).standard_normal(64) * 1e-3).astype(np.float32)
    row4[17] = 1000.0  # one huge outlier
    row5 = (np.random.default_rng(6).standard_normal(64) * 1e-39).astype(np.float32)  # subnormal
    row6 = (np.random.default_rng(7).standard_normal(64) * 3.0).astype(np.float32)
    row6[::7] *= np.float32(1.0 / 3.0)
    return np.stack([row0, row1, row2, row3, row4, row5, row6, row6[::-1]])


def make_nf4():
    rng = np.random.default_rng(1234)
    nf4_case("normal_8x128_b64", rng.standard_normal((8, 128)).astype(np.float32), 64, False,
             "N(0, 1), 16 blocks of 64, no double quantization")
    nf4_case("normal_8x128_b64_dq", rng.standard_normal((8, 128)).astype(np.float32), 64, True,
             "N(0, 1), 16 blocks of 64, double quantized (one nested block)")
    nf4_case("scaled_12x256_b32_dq",
             (rng.standard_normal((12, 256)) * rng.uniform(0.01, 3.0, (12, 1))).astype(np.float32),
             32, True, "rows with different scales, 96 blocks of 32, double quantized")
    nf4_case("normal_10x1024_b32_dq", rng.standard_normal((10, 1024)).astype(np.float32), 32,
             True, "320 blocks: two nested blocks, the second one partial (64 absmaxes)")
    nf4_case("normal_2x4096_b4096", rng.standard_normal((2, 4096)).astype(np.float32), 4096,
             False, "the largest block size, one block per row")
    nf4_case("edges_8x64_b64", nf4_tie_matrix(), 64, False,
             "ties on thresholds, exact levels, zero, constant, outlier and subnormal blocks")
    nf4_case("edges_8x64_b64_dq", nf4_tie_matrix(), 64, True,
             "the same edge cases, double quantized")
    nf4_case("one_row_1x64_b64", rng.standard_normal((1, 64)).astype(np.float32), 64, True,
             "out = 1 and in = one block, double quantized (one absmax, centred to zero)")


# ---------------------------------------------------------------------------------------
# INT4 / INT8 (numpy, the rule stated in int_quant.hpp)


def int_quantize_ref(w, group, bits_, symmetric):
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group).astype(np.float32)
    if symmetric:
        qpos = F32(2 ** (bits_ - 1) - 1)
        absmax = np.max(np.abs(g), axis=-1, keepdims=True).astype(np.float32)
        scale = (absmax / qpos).astype(np.float32)
        safe = np.where(scale == 0, F32(1), scale).astype(np.float32)
        q = np.clip(np.rint((g / safe).astype(np.float32)), -qpos, qpos)
        q = np.where(scale == 0, F32(0), q).astype(np.int64)
        deq = (scale * q.astype(np.float32)).astype(np.float32)
        codes = (q + 8) if bits_ == 4 else (q & 0xFF)
        mins = None
    else:
        qmax = F32(2 ** bits_ - 1)
        lo = np.min(g, axis=-1, keepdims=True).astype(np.float32)
        hi = np.max(g, axis=-1, keepdims=True).astype(np.float32)
        scale = ((hi - lo).astype(np.float32) / qmax).astype(np.float32)
        safe = np.where(scale == 0, F32(1), scale).astype(np.float32)
        u = np.clip(np.rint(((g - lo).astype(np.float32) / safe).astype(np.float32)), 0, qmax)
        u = np.where(scale == 0, F32(0), u).astype(np.int64)
        deq = ((scale * u.astype(np.float32)).astype(np.float32) + lo).astype(np.float32)
        codes = u
        mins = lo.reshape(rows, -1)
    codes = codes.reshape(rows, cols)
    if bits_ == 4:
        codes = (codes[:, 0::2] << 4) | codes[:, 1::2]
    return codes.astype(np.uint8), scale.reshape(rows, -1), mins, deq.reshape(rows, cols)


def int_case(name, w, group, bits_, symmetric, note):
    w = np.ascontiguousarray(w, dtype=np.float32)
    codes, scales, mins, deq = int_quantize_ref(w, group, bits_, symmetric)
    case = {
        "name": name, "note": note, "versions": versions(),
        "rows": int(w.shape[0]), "cols": int(w.shape[1]), "block_size": group,
        "bits": bits_, "symmetric": symmetric,
        "weights": bits(w), "codes": codes.ravel().tolist(), "scales": bits(scales),
        "dequantized": bits(deq),
    }
    if mins is not None:
        case["mins"] = bits(mins)
    write(f"int{bits_}_" + name, case)


def int_edge_matrix(cols):
    rng = np.random.default_rng(99)
    rows = [
        np.zeros(cols, np.float32),
        np.full(cols, F32(-0.8125), np.float32),
        (rng.standard_normal(cols) * 1e-3).astype(np.float32),
        (rng.standard_normal(cols) * 1e-40).astype(np.float32),
        np.linspace(-1.0, 1.0, cols, dtype=np.float32),
        (np.arange(cols, dtype=np.float32) * F32(0.5)).astype(np.float32),  # symmetric ties
        ((np.arange(cols) % 31) * 0.5).astype(np.float32),  # range 15: affine INT4 ties
    ]
    rows[2][5] = 500.0
    return np.stack(rows)


def make_int():
    rng = np.random.default_rng(4321)
    for bits_ in (4, 8):
        for symmetric in (False, True):
            kind = "sym" if symmetric else "asym"
            int_case(f"{kind}_normal_6x256_g32", rng.standard_normal((6, 256)), 32, bits_,
                     symmetric, "N(0, 1), groups of 32")
            int_case(f"{kind}_normal_4x384_g128", rng.standard_normal((4, 384)) * 0.02, 128,
                     bits_, symmetric, "N(0, 0.02^2), groups of 128")
            int_case(f"{kind}_edges_7x64_g64", int_edge_matrix(64), 64, bits_, symmetric,
                     "zero, constant, outlier, subnormal, ramp and round-half-even ties")
    int_case("asym_perrow_3x96", rng.standard_normal((3, 96)), 96, 8, False,
             "one group per row (per output channel)")
    int_case("sym_perrow_3x96", rng.standard_normal((3, 96)), 96, 8, True,
             "one group per row (per output channel)")


def make_gptq():
    """GPTQ-for-LLaMa quantizer.py, asymmetric 4-bit per group, torch.round (RNE)."""
    rng = np.random.default_rng(77)
    w = rng.standard_normal((4, 128)).astype(np.float32) * F32(0.05)
    group, qmax = 32, F32(15)
    g = w.reshape(4, -1, group)
    xmin = np.minimum(g.min(axis=-1), F32(0)).astype(np.float32)
    xmax = np.maximum(g.max(axis=-1), F32(0)).astype(np.float32)
    scale = ((xmax - xmin) / qmax).astype(np.float32)
    zero = np.rint((-xmin / scale).astype(np.float32)).astype(np.float32)
    q = np.clip(np.rint((g / scale[..., None]).astype(np.float32)) + zero[..., None], 0, qmax)
    deq = (scale[..., None] * (q - zero[..., None]).astype(np.float32)).astype(np.float32)
    write("gptq_asym_4x128_g32", {
        "name": "gptq_asym_4x128_g32",
        "note": "GPTQ-for-LLaMa find_params/quantize formula (sym=False), in numpy",
        "versions": versions(), "rows": 4, "cols": 128, "block_size": group,
        "scales": bits(scale), "zeros": zero.astype(np.int64).ravel().tolist(),
        "q": q.astype(np.int64).ravel().tolist(), "dequantized": bits(deq.reshape(4, 128)),
    })


if __name__ == "__main__":
    torch.manual_seed(0)
    make_tables()
    make_nf4()
    make_int()
    make_gptq()
