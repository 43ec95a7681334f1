"""Synthetic retrieval data for the `lwm train` demo (docs/training.md): a number hidden at a
random depth in filler text, asked for at the end. JSONL with `prompt` (no loss) and `answer`.

    python3 scripts/make_needle_train_data.py --bytes 500 --count 4000 --seed 1 > train.jsonl
"""
import argparse
import json
import random

WORDS = "the grass is green the sky is blue the sun is yellow here we go there and back again".split()

ap = argparse.ArgumentParser()
ap.add_argument("--bytes", type=int, default=500, help="approximate prompt length (byte tokens)")
ap.add_argument("--count", type=int, default=1000)
ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()
rng = random.Random(a.seed)
question = " What is the special magic number? The special magic number is"
for _ in range(a.count):
    key = rng.randrange(10000, 100000)
    needle = f" The special magic number is {key}."
    room = max(0, a.bytes - len(needle) - len(question))
    words = []
    while sum(len(w) + 1 for w in words) < room:
        words.append(rng.choice(WORDS))
    filler = " ".join(words)[:room]
    spaces = [i for i, c in enumerate(filler) if c == " "] or [len(filler)]
    depth = rng.choice(spaces)
    prompt = filler[:depth] + needle + filler[depth:] + question
    print(json.dumps({"prompt": prompt, "answer": f" {key}."}))
