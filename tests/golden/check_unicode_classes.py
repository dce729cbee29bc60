#!/usr/bin/env python3
"""Check src/model/unicode_tables.inc against Hugging Face tokenizers, code point by code point.

For every code point (surrogates, U+0020 and U+0027 aside) this derives the class that
tokenizers' Sequence[Digits(individual_digits=true), ByteLevel(use_regex=true)] pre-tokenizer
gives it, from how it splits three probe strings, and compares it with the class that
scripts/gen_unicode_tables.py assigns. It prints the differences and exits non-zero when there
are any. Takes about 25 seconds.

Package versions of the last run (0 differences): tokenizers 0.23.3, unicodedata2 16.0.0.
    python tests/golden/check_unicode_classes.py --unicodedata2
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import gen_unicode_tables as tables  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402

PRE = pre_tokenizers.Sequence([
    pre_tokenizers.Digits(individual_digits=True),
    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])


def pieces(text):
    return len(PRE.pre_tokenize_str(text))


def reference_class(c):
    # A letter joins the "x" on both sides, and an "other" character joins a following "!".
    # Numbers and whitespace stand alone in both probes. Two numbers split, two whitespace
    # characters do not.
    if pieces("x" + c + "x") == 1:
        return tables.LETTER
    if pieces(c + "!") == 1:
        return 0
    return tables.NUMBER if pieces(c + c) == 2 else tables.SPACE


def main():
    differences = []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF or cp in (0x20, 0x27):
            continue
        ours = tables.char_class(cp)
        if ours == tables.DIGIT_SPLIT:
            ours = tables.NUMBER  # split off like a number by these probes
        theirs = reference_class(chr(cp))
        if ours != theirs:
            differences.append(cp)
            print(f"U+{cp:04X}: table {ours}, tokenizers {theirs}")
    print(f"Unicode {tables.unicodedata.unidata_version}: {len(differences)} differences")
    sys.exit(1 if differences else 0)


if __name__ == "__main__":
    main()
