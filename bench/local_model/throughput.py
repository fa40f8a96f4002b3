"""The local CPU model's throughput, which its default price (``TOLLWAY_LOCAL_*``) attributes machine time
from: prefill tokens per second over a 400-token prompt, and decode tokens per second over 64 forced tokens
(an end of sequence replaced by a filler token), with llama.cpp on the gateway's threads (2 here).

    python bench/local_model/throughput.py [--threads 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    from llama_cpp import Llama

    from tollway.local.embedded import local_model_path

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    llm = Llama(model_path=str(local_model_path()), n_ctx=2048, n_threads=args.threads, verbose=False)
    prompt = llm.tokenize(("The quick brown fox jumps over the lazy dog. " * 40).encode())
    prefill, decode = [], []
    for _ in range(args.runs):
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        prefill.append(len(prompt) / (time.perf_counter() - started))
        llm.reset()
        llm.eval(llm.tokenize(b"Once upon a time"))
        started = time.perf_counter()
        filler = llm.tokenize(b" the", add_bos=False)[0]
        for _ in range(64):
            token = llm.sample(temp=0.0)
            llm.eval([filler if token == llm.token_eos() else token])  # the cost of a step is the same
        decode.append(64 / (time.perf_counter() - started))
    print(f"prefill: {statistics.median(prefill):.0f} tokens/s over {len(prompt)} tokens (median of {args.runs})")
    print(f"decode:  {statistics.median(decode):.0f} tokens/s over 64 tokens (median of {args.runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
