"""Sampling throughput: the batched, KV-cached path against one prompt and one sequence at a time.

Both paths run in the same process on the same model and prompts (the bundled
world base model by default), so the ratio is a fair same-session comparison.
Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from app import loop

    loop.wire()  # the services run in this process: wire the stages' reactions
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "world-base"), help="model path or hub id")
    parser.add_argument("--prompts", type=int, default=64, help="number of world prompts")
    parser.add_argument("--k", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="tokens per completion at most")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per generate call (batched path)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="a small run (16 prompts)")
    args = parser.parse_args()
    if args.quick:
        args.prompts = 16

    import torch

    from app.world import generate_prompts
    from worker.generate import sample_completions, sample_one_at_a_time
    from worker.modeling import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    prompts = [p.text for p in generate_prompts(args.prompts, seed=5)]
    # No newline stop and no resampling: both paths generate exactly the same number of tokens.
    common = {
        "temperature": 1.0,
        "top_p": 1.0,
        "max_new_tokens": args.max_new_tokens,
        "seed": 0,
        "max_resample_tries": 0,
        "stop_at_newline": False,
    }

    def tokens(outputs: list[list[str]]) -> int:
        return sum(len(tokenizer(t, add_special_tokens=False).input_ids) for row in outputs for t in row)

    sample_completions(model, tokenizer, prompts[:2], args.k, batch_size=args.batch_size, **common)  # warm-up
    start = time.perf_counter()
    batched = sample_completions(model, tokenizer, prompts, args.k, batch_size=args.batch_size, **common)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    single = sample_one_at_a_time(model, tokenizer, prompts, args.k, **common)
    single_s = time.perf_counter() - start
    result = {
        "benchmark": "sampling",
        "model": Path(args.model).name,
        "prompts": args.prompts,
        "k": args.k,
        "max_new_tokens": args.max_new_tokens,
        "batched_s": round(batched_s, 3),
        "one_at_a_time_s": round(single_s, 3),
        "batched_tokens_per_s": round(tokens(batched) / batched_s, 1),
        "one_at_a_time_tokens_per_s": round(tokens(single) / single_s, 1),
        "speedup": round(single_s / batched_s, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
