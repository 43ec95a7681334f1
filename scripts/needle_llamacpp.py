#!/usr/bin/env python3
"""Run a needle run directory's prompts through llama.cpp (llama-cpp-python) and compare.

Reads DIR/set.jsonl (the exact prompt token ids `lwm needle run` used) and DIR/results.jsonl
(lwm's answers), runs each prompt greedily through llama.cpp on the same GGUF, each in a
fresh context (so lwm's shared-prefix KV reuse is checked too), and compares per cell:
the answer token ids, and whether each asked-for number appears (the score).

    python3 scripts/needle_llamacpp.py DIR [--model FILE.gguf] [--max-cells N] [--out FILE.json]
    python3 scripts/needle_llamacpp.py DIR --fixture FILE.json   # llama.cpp's answers only
    python3 scripts/needle_llamacpp.py DIR --answers FILE.json --out cmp.json
        # compare lwm's results with llama.cpp answers recorded earlier by --fixture
        # (so the slow llama.cpp pass can run before or apart from lwm's)

Without DIR/results.jsonl it only records llama.cpp's answers (`--fixture` writes them in
the form crates/lwm/tests/fixtures/needle/llamacpp-answers.json uses).

Exit status 1 when a cell's score differs (token differences after the number are reported,
not failed: the issue allows at most one differing sample per cell and asks to explain).
"""

import argparse
import json
import sys
import time

import numpy as np
import llama_cpp


def load_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--model", help="GGUF file (default: the set's model)")
    ap.add_argument("--max-cells", type=int, default=0, help="compare only the first N cells")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the per-cell comparison as JSON here")
    ap.add_argument("--fixture", help="write llama.cpp's answers per cell id (test fixture)")
    ap.add_argument("--answers", help="llama.cpp answers recorded earlier with --fixture: compare, do not run llama.cpp")
    a = ap.parse_args()

    rows = load_jsonl(f"{a.dir}/set.jsonl")
    header, cases = rows[0], {c["id"]: c for c in rows[1:]}
    try:
        results = load_jsonl(f"{a.dir}/results.jsonl")
    except FileNotFoundError:
        # No lwm answers yet: record llama.cpp's, in set order.
        results = [{"id": c["id"], "response": None, "response_ids": None, "needles": c["needles"]} for c in rows[1:]]
    if a.max_cells:
        results = results[: a.max_cells]
    model = a.model or header["model"]
    n_ctx = max(c["context_length"] for c in cases.values())
    answer_tokens = header["needle_set"]["answer_tokens"]
    recorded = None
    if a.answers:
        with open(a.answers, encoding="utf-8") as f:
            recorded = json.load(f)
    else:
        llm = llama_cpp.Llama(
            model_path=model, n_ctx=n_ctx, n_batch=512, n_threads=a.threads, verbose=False
        )
        vocab = llm._model.vocab

    def is_eog(tok):
        return bool(llama_cpp.llama_vocab_is_eog(vocab, tok))

    def llamacpp_answer(c):
        """(answer ids, text, whether llama.cpp tokenizes the prompt text to the same ids)."""
        ids = c["prompt_ids"]
        if recorded is not None:
            rec = recorded[c["id"]]
            return rec["answer_ids"], rec["response"], rec.get("prompt_tokenization_matches_llamacpp", True)
        same_tokens = llm.tokenize(c["prompt"].encode("utf-8"), add_bos=False, special=True) == ids
        llm.reset()
        llm.eval(ids)
        out = []
        while len(out) < answer_tokens and len(ids) + len(out) < n_ctx:
            # Without logits_all, the context holds the last evaluated token's logits only.
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            tok = int(np.argmax(logits))
            if is_eog(tok):
                break
            out.append(tok)
            llm.eval([tok])
        return out, llm.detokenize(out).decode("utf-8", errors="replace"), same_tokens

    cells, score_diff, token_diff, tok_mismatch = [], 0, 0, 0
    for r in results:
        c = cases[r["id"]]
        ids = c["prompt_ids"]
        t0 = time.time()
        out, text, same_tokens = llamacpp_answer(c)
        tok_mismatch += not same_tokens
        asked = [n for n in c["needles"] if n["retrieve"]]
        found = [str(n["number"]) in text for n in asked]
        ours = [n.get("found") for n in r["needles"] if n["retrieve"]]
        same_ids = out == r["response_ids"]
        # Common prefix of the two answers, in tokens.
        common = 0
        lwm_ids = r["response_ids"] or []
        while common < min(len(out), len(lwm_ids)) and out[common] == lwm_ids[common]:
            common += 1
        score_diff += found != ours
        token_diff += not same_ids
        cells.append(
            {
                "id": r["id"],
                "same_answer_ids": same_ids,
                "common_prefix_tokens": common,
                "same_score": found == ours,
                "lwm_found": ours,
                "llamacpp_found": found,
                "lwm_response": r["response"],
                "llamacpp_response": text,
                "llamacpp_answer_ids": out,
                "prompt_ids_len": len(ids),
                "prompt_tokenization_matches_llamacpp": same_tokens,
                "llamacpp_secs": round(time.time() - t0, 2),
            }
        )
        print(
            f"{r['id']:>16}  ids {'same' if same_ids else f'differ after {common}'}"
            f"  score {'same' if found == ours else 'DIFFERS'}  lwm={ours} llama.cpp={found}",
            flush=True,
        )
    summary = {
        "model": model,
        "llama_cpp_python": llama_cpp.__version__,
        "cells": len(cells),
        "same_answer_ids": len(cells) - token_diff,
        "same_score": len(cells) - score_diff,
        "prompt_tokenization_matches_llamacpp": len(cells) - tok_mismatch,
        "per_cell": cells,
    }
    print(
        f"{len(cells)} cells: answers token-identical in {len(cells) - token_diff}, "
        f"same score in {len(cells) - score_diff}; llama.cpp tokenizes the prompt text to the "
        f"same ids in {len(cells) - tok_mismatch}"
    )
    if a.fixture:
        fixture = {
            c["id"]: {
                "prompt_ids_len": c["prompt_ids_len"],
                "answer_ids": c["llamacpp_answer_ids"],
                "found": all(c["llamacpp_found"]),
                "response": c["llamacpp_response"],
                "prompt_tokenization_matches_llamacpp": c["prompt_tokenization_matches_llamacpp"],
            }
            for c in cells
        }
        with open(a.fixture, "w", encoding="utf-8") as f:
            json.dump(fixture, f, indent=1)
            f.write("\n")
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")
    compared = [c for c in cells if c["lwm_found"] and c["lwm_found"][0] is not None]
    return 1 if compared and score_diff else 0


if __name__ == "__main__":
    sys.exit(main())
