"""Per-context-length breakdown of an `lwm needle run` results.jsonl (docs/training.md demo):
needles retrieved (the number in the response, as the run scores it), city named right (the
city's name in the response), and digits in the right place (the seven characters after the
response's last "is:" against the needle's number, place by place; chance 10 %).

    python3 scripts/needle_breakdown.py docs/training/needle3-before/results.jsonl
"""
import collections
import json
import sys


def main():
    rows = collections.defaultdict(lambda: [0, 0, 0, 0])  # cells, found, city, digits right
    for line in open(sys.argv[1]):
        r = json.loads(line)
        n = r["needles"][0]
        resp = r["response"]
        tail = resp.rsplit("is:", 1)[-1].strip()[:7] if "is:" in resp else ""
        digits = sum(a == b for a, b in zip(tail, str(n["number"])))
        c = rows[r["context_length"]]
        c[0] += 1
        c[1] += bool(n["found"])
        c[2] += n["city"] in resp
        c[3] += digits
    print("| context | needles retrieved | city named right | digits in the right place (chance 10 %) |")
    print("|---|---|---|---|")
    for length in sorted(rows):
        cells, found, city, dig = rows[length]
        print(
            f"| {length} | {found} / {cells} = {100 * found / cells:.0f} % | {city} / {cells} | "
            f"{dig} / {7 * cells} = {100 * dig / (7 * cells):.1f} % |"
        )


if __name__ == "__main__":
    main()
