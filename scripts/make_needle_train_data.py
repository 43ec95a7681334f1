"""Synthetic retrieval data for the `lwm train` demo (docs/training.md), in exactly the prompt
layout `lwm needle run --chat-format lwm` evaluates (crates/lwm/src/needle/set.rs), at the
byte level: LWM's chat prefix, a stretch of real prose with one needle
"\\nThe special magic {city} number is: {7 digits}\\n" spliced in just after a period at a
random depth, then LWM's question and instruction. JSONL with `prompt` (the document),
`question` (question, instruction and `ASSISTANT: `) and `answer`: `[prompt],question,answer`
is the evaluation's prompt followed by the answer, token for token.

The answer repeats the needle sentence ("The special magic {city} number is: {number}"), so
the digits follow an exact repeat of the needle's key: the model can learn to copy (an
induction circuit) instead of having to locate the number from the question alone. The
needle evaluation scores a cell correct when the number appears in the answer.

Filler: Exodus (`--split train`) or Genesis (`--split eval`) of the bundled KJV haystack, so
the training prose is disjoint from the prose `lwm needle --haystack genesis.txt` hides
needles in. `--write-haystack FILE` writes the Genesis text for that.

`--copy` writes the curriculum that comes first in the demo: a random string (digits, or
letters, digits and spaces), a newline, and the string again as the answer. Only an
induction head (find the earlier occurrence of the current token, copy what followed it)
predicts the repeat, and the needle answer's digits are the same kind of copy.

`--no-colons` replaces every ":" of the prose with ";" (train filler and `--write-haystack`
alike), so the needle's ": " (and its "is: ") is the only one in the document: the first digit
follows a key found nowhere else. The evaluation haystack must then be written with the same
flag. `--lead-in-question` moves the answer's lead ("The special magic {city} number is: ") into
the no-loss question, so the loss (an eval file's loss) is on the seven digits alone.

    python3 scripts/make_needle_train_data.py --min-bytes 300 --max-bytes 448 --count 20000 --seed 1 > train.jsonl
"""
import argparse
import json
import pathlib
import random
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
HAYSTACK = ROOT / "crates/lwm/assets/haystack/kjv-genesis-exodus.txt"
# crates/lwm/src/needle/set.rs: CITIES, needle_sentence, question, SINGLE_INSTRUCTION, Lwm parts.
CITIES = """Chicago Yangon Antananarivo Colombo Almaty Sydney Mexico_City Seattle Lagos Amsterdam
Belgrade Cairo Baghdad Damascus Kigali Dakar Sofia Victoria Tashkent Mumbai Barcelona Havana
Kathmandu Helsinki Lima Oslo Jakarta Dublin Rome Toronto Montevideo Nairobi Lisbon Santiago
Bangkok Istanbul Seoul Hanoi Quito Warsaw Prague Vienna Budapest Athens Riyadh Manila Bogota
Caracas Accra Addis_Ababa Dhaka Karachi Tehran Kabul Ulaanbaatar Vancouver Melbourne Auckland
Reykjavik Copenhagen Stockholm Zurich Brussels Edinburgh Marrakesh Tunis Luanda Kinshasa
Osaka""".split()
CITIES = [c.replace("_", " ") for c in CITIES]
PREFIX = "You are a helpful assistant. USER:"
INSTRUCTION = (
    "Don't give information outside the document or repeat your findings. "
    "Keep your response short and direct."
)


def split_text(split, no_colons=False):
    text = HAYSTACK.read_text()
    if no_colons:
        text = text.replace(":", ";")
    at = text.index("THE SECOND BOOK OF MOSES")
    return text[:at] if split == "eval" else text[at:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-bytes", type=int, default=300, help="shortest prompt (byte tokens, BOS excluded)")
    ap.add_argument("--max-bytes", type=int, default=448, help="longest prompt")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", choices=["train", "eval"], default="train")
    ap.add_argument(
        "--short",
        action="store_true",
        help="curriculum format: no chat prefix, no instruction",
    )
    ap.add_argument(
        "--copy",
        action="store_true",
        help="curriculum: a random string of letters and digits, then the same string again "
        "(loss on the repeat): the induction/copy circuit the needle answer needs forms fast",
    )
    ap.add_argument("--no-colons", action="store_true", help="prose ':' -> ';' (also for --write-haystack)")
    ap.add_argument(
        "--lead-in-question",
        action="store_true",
        help="answer = the 7 digits only; its lead sentence goes to the end of the question (no loss)",
    )
    ap.add_argument("--write-haystack", help="write the eval (Genesis) prose to this file and exit")
    a = ap.parse_args()
    if a.write_haystack:
        pathlib.Path(a.write_haystack).write_text(split_text("eval", a.no_colons))
        return
    rng = random.Random(a.seed)
    hay = split_text(a.split, a.no_colons)
    periods = [i + 1 for i, c in enumerate(hay) if c == "."]
    for _ in range(a.count):
        if a.copy:
            n = rng.randint(max(a.min_bytes, 2) // 2, max(a.max_bytes, 2) // 2)
            alphabet = "0123456789" if rng.random() < 0.5 else "abcdefghijklmnopqrstuvwxyz0123456789 "
            text = "".join(rng.choice(alphabet) for _ in range(n))
            print(json.dumps({"prompt": text, "question": "\n", "answer": text}))
            continue
        city = rng.choice(CITIES)
        number = rng.randrange(1_000_000, 10_000_000)
        needle = f"\nThe special magic {city} number is: {number}\n"
        question = f" What is the special magic {city} number? {INSTRUCTION} ASSISTANT: "
        prefix = PREFIX
        if a.short:
            question, prefix = f" What is the special magic {city} number? ", ""
        total = rng.randint(a.min_bytes, a.max_bytes)
        n_hay = total - len(prefix) - len(needle) - len(question)
        if n_hay < 1:
            sys.exit(f"--min-bytes {a.min_bytes} leaves no room for filler")
        start = rng.choice(periods)
        while start + n_hay > len(hay):
            start = rng.choice(periods)
        body = hay[start : start + n_hay]
        # Depth as the evaluation: int(n * d / 100) moved back to just after a period.
        depth = rng.randint(0, 100)
        p = len(body) if depth == 100 else len(body) * depth // 100
        if depth < 100:
            while p > 0 and body[p - 1] != ".":
                p -= 1
        answer = f"The special magic {city} number is: {number}"
        document = prefix + body[:p] + needle + body[p:]
        if a.lead_in_question:
            lead = f"The special magic {city} number is: "
            question, answer = question + lead, answer[len(lead) :]
        print(json.dumps({"prompt": document, "question": question, "answer": answer}))


if __name__ == "__main__":
    main()
