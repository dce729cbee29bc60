#!/usr/bin/env python3
"""Writes the LoRA golden files under tests/golden/lora/ from PEFT and bitsandbytes on CPU.

Made with: Python 3.11.7, torch 2.15.0, bitsandbytes 0.50.2, peft 0.21.2, transformers 5.25.0,
safetensors 0.8.0, numpy 2.4.6.

1. loftq_*.json: PEFT's LoftQ on a seeded 64 x 128 matrix, rank 4, T = 1 and T = 3.
   peft.utils.loftq_utils.loftq_init moves the weight to a CUDA or XPU device unconditionally,
   so this script runs the same loop on CPU: bitsandbytes' Params4bit (NF4, block 64,
   compress_statistics=False, exactly as loftq_init constructs it) and PEFT's own
   _low_rank_decomposition for the SVD split.
2. peft_tiny/: an adapter directory written by PEFT's save_pretrained for a tiny random Llama
   (hidden 32, 2 layers, all seven projections, r = 4, alpha = 8), plus peft_tiny_io.json with
   the base weight of layers.0.self_attn.q_proj, an input and PEFT's layer output.
3. With --check-qlora DIR: loads an adapter directory that qlora wrote (the lora tests write
   one when QLORA_PEFT_EXPORT_DIR is set) into PEFT on the same tiny model and compares the
   layer output with the values qlora stored in DIR/expected.json.

Usage: python3 tests/golden/make_lora_golden.py [--check-qlora DIR]
"""
import argparse
import json
import os
import sys

import bitsandbytes as bnb
import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.loftq_utils import _low_rank_decomposition
from transformers import LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "lora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def floats(t):
    # repr of a float32 converted to Python float round-trips exactly.
    return [float(v) for v in t.detach().reshape(-1).to(torch.float32).numpy()]


def loftq_cpu(weight, rank, num_iter):
    """The loop body of peft.utils.loftq_utils.loftq_init (num_bits=4), run on CPU."""
    res = weight.clone()
    for i in range(num_iter):
        qweight = bnb.nn.Params4bit(res, requires_grad=False, compress_statistics=False,
                                    quant_type="nf4")
        qweight = qweight._quantize("cpu")
        deq = bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state)
        res = weight - deq
        out = _low_rank_decomposition(res, reduced_rank=rank)
        L, R = out["L"], out["R"]
        if i + 1 == num_iter:
            break
        res = weight - torch.mm(L, R)
    return qweight, deq, R, L


def write_loftq():
    torch.manual_seed(0)
    rows, cols, rank = 64, 128, 4
    weight = torch.randn(rows, cols) * 0.02 + 0.004 * torch.randn(rows, 4) @ torch.randn(4, cols)
    for num_iter in (1, 3):
        qweight, deq, lora_a, lora_b = loftq_cpu(weight, rank, num_iter)
        state = qweight.quant_state
        record = {
            "rows": rows, "cols": cols, "rank": rank, "iterations": num_iter,
            "block_size": state.blocksize,
            "weight": floats(weight),
            "codes": [int(v) for v in qweight.data.reshape(-1).numpy()],
            "absmax": floats(state.absmax),
            "dequantized": floats(deq),
            "lora_A": floats(lora_a),
            "lora_B": floats(lora_b),
        }
        path = os.path.join(OUT, f"loftq_r{rank}_t{num_iter}.json")
        with open(path, "w") as f:
            json.dump(record, f)
        print("wrote", path)


def tiny_model():
    torch.manual_seed(1)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def write_peft_tiny():
    model = tiny_model()
    base_q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian",
                        lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    out_dir = os.path.join(OUT, "peft_tiny")
    peft_model.save_pretrained(out_dir)

    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    torch.manual_seed(3)
    x = torch.randn(3, 32)
    with torch.no_grad():
        y = layer(x)
    with open(os.path.join(OUT, "peft_tiny_io.json"), "w") as f:
        json.dump({"module": "model.layers.0.self_attn.q_proj", "base_weight": floats(base_q),
                   "out": 32, "in": 32, "x": floats(x), "rows": 3, "y": floats(y)}, f)
    print("wrote", out_dir)


def check_qlora(directory):
    with open(os.path.join(directory, "expected.json")) as f:
        expected = json.load(f)
    model = tiny_model()
    peft_model = PeftModel.from_pretrained(model, directory).eval()
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.tensor(expected["x"], dtype=torch.float32).reshape(expected["rows"], -1)
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
    want = np.array(expected["adapter_output"], dtype=np.float32).reshape(delta.shape)
    err = float(np.max(np.abs(delta.numpy() - want)))
    print(f"PEFT loaded the qlora adapter; max |difference| of the adapter output: {err:.3g}")
    return 0 if err < 1e-5 else 1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check-qlora", metavar="DIR")
    args = parser.parse_args()
    if args.check_qlora:
        return check_qlora(args.check_qlora)
    os.makedirs(OUT, exist_ok=True)
    write_loftq()
    write_peft_tiny()
    return 0


if __name__ == "__main__":
    sys.exit(main())
