#!/usr/bin/env python3
"""Writes the golden next-token logits of SmolLM2-135M-Instruct for the C++ Llama tests.

The C++ side is tests/model/llama_smollm2_test.cpp.

An independent forward pass: Hugging Face transformers loads the GGUF file with `gguf_file=`,
which dequantizes every tensor to float32 and un-permutes the q/k rows, and runs
LlamaForCausalLM on the CPU in float32. For each of three prompts (given to the C++ test as
token ids) the script stores the last position's top-50 logits and ids, every 97th logit of the
whole vocabulary, and the sum and sum of squares of all 49152 logits, so the file stays small.

Versions used to produce tests/golden/llama/*.json:
  python 3.11.7, torch 2.15.0 (CPU execution), transformers 5.25.0, accelerate 1.16.0,
  gguf 0.19.0, numpy 2.4.6

Usage (from the repository root, after scripts/fetch-model):
  python tests/golden/make_llama_golden.py models/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import argparse
import json
import pathlib

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = {
    "plain": "The capital of France is",
    "chat": "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "code": "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
}
TOP_K = 50
SAMPLE_STRIDE = 97


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=pathlib.Path, help="path to the SmolLM2 GGUF file")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "llama")
    args = parser.parse_args()

    torch.set_num_threads(2)
    directory, name = str(args.gguf.parent), args.gguf.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                 dtype=torch.float32)
    model.eval()

    args.out.mkdir(parents=True, exist_ok=True)
    for key, text in PROMPTS.items():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double().numpy()
        top = np.argsort(-logits, kind="stable")[:TOP_K]
        record = {
            "model": name,
            "text": text,
            "token_ids": [int(i) for i in ids],
            "vocab_size": int(logits.shape[0]),
            "top_ids": [int(i) for i in top],
            "top_logits": [float(logits[i]) for i in top],
            "sample_stride": SAMPLE_STRIDE,
            "sample_logits": [float(v) for v in logits[::SAMPLE_STRIDE]],
            "sum": float(logits.sum()),
            "sum_squares": float((logits * logits).sum()),
            "generator": f"transformers {transformers.__version__}, torch {torch.__version__}",
        }
        path = args.out / f"smollm2_{key}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"{path}: {len(ids)} tokens, top-5 {record['top_ids'][:5]}")


if __name__ == "__main__":
    main()
