#!/usr/bin/env python3
"""Generate the small SentencePiece fixture used by crates/lwm/tests/tokenizer_formats.rs.

Trains a tiny BPE `tokenizer.model` (byte fallback, identity normalization, like
LLaMA's) on a synthetic corpus and records what Python `sentencepiece` returns for a set
of test strings, so the Rust reader and SPM tokenizer can be checked against it.

    pip install sentencepiece
    python3 scripts/make_spm_fixture.py

Writes crates/lwm/tests/fixtures/tokenizer/spm-tiny.model and spm-tiny.json.
"""

import json
import os
import random
import sys
import tempfile

import sentencepiece as spm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "crates", "lwm", "tests", "fixtures", "tokenizer")
CASES_FROM = os.path.join(OUT_DIR, "ggml-vocab-llama-spm.gguf.inp")

WORDS = (
    "the of and to in is was for that with as on by at from this be are it an or "
    "world model large long context attention block token window memory video book "
    "hello there general kenobi you are a helpful assistant user question answer "
    "what where when who how why capital france paris germany berlin italy rome "
    "cafe café naïve résumé über straße привет мир 你好 世界 こんにちは 🦙 ✅ "
    "one two three four five six seven eight nine ten 1 2 3 42 100 2024 3.14 "
    "llama rust candle tensor matrix vector gradient learning training inference"
).split()

EXTRA_CASES = [
    "Hello world",
    "  leading and   repeated   spaces  ",
    "tabs\tand\nnewlines\r\n",
    "<tool>call</tool> and <tool> again",
    "The capital of France is Paris.",
    "unknown chars: ∮ ⅏ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "",
    " ",
]


def corpus(n_lines=4000, seed=1234):
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        k = rng.randint(3, 14)
        words = [rng.choice(WORDS) for _ in range(k)]
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        line = " ".join(words)
        line += rng.choice([".", "!", "?", ",", "", ":", ";"])
        lines.append(line)
    return lines


def read_cases():
    with open(CASES_FROM, encoding="utf-8") as f:
        text = f.read()
    sep = "\n__ggml_vocab_test__\n"
    assert text.endswith(sep)
    return text[: -len(sep)].split(sep)


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "corpus.txt")
        with open(data, "w", encoding="utf-8") as f:
            f.write("\n".join(corpus()) + "\n")
        prefix = os.path.join(tmp, "spm-tiny")
        spm.SentencePieceTrainer.train(
            input=data,
            model_prefix=prefix,
            model_type="bpe",
            vocab_size=700,
            character_coverage=1.0,
            byte_fallback=True,
            normalization_rule_name="identity",
            user_defined_symbols=["<tool>", "</tool>"],
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
        )
        with open(prefix + ".model", "rb") as f:
            model_bytes = f.read()

    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    cases = []
    for text in read_cases() + EXTRA_CASES:
        cases.append({"text": text, "ids": sp.encode(text)})
    out_model = os.path.join(OUT_DIR, "spm-tiny.model")
    with open(out_model, "wb") as f:
        f.write(model_bytes)
    header = {
        "sentencepiece_version": spm.__version__,
        "vocab_size": sp.get_piece_size(),
        "bos_id": sp.bos_id(),
        "eos_id": sp.eos_id(),
        "unk_id": sp.unk_id(),
    }
    with open(os.path.join(OUT_DIR, "spm-tiny.json"), "w", encoding="utf-8") as f:
        # One case per line keeps the file readable and diffs small.
        f.write("{\n")
        for k, v in header.items():
            f.write(f" {json.dumps(k)}: {json.dumps(v)},\n")
        f.write(' "cases": [\n')
        lines = [" " + json.dumps(c, ensure_ascii=False) for c in cases]
        f.write(",\n".join(lines))
        f.write("\n ]\n}\n")
    print(f"wrote {out_model} ({len(model_bytes)} bytes) and {len(cases)} cases", file=sys.stderr)


if __name__ == "__main__":
    main()
