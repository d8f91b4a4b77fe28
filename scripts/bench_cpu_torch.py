"""PyTorch side of `cargo bench --bench cpu_vs_torch`: the same checkpoint and
input through transformers' Qwen2_5_VLForConditionalGeneration on the CPU
(fp32, SDPA attention), timed as the Rust side times the engine: the
forward to the final hidden states, and forward + backward of the sum of
the response tokens' log-probs (the head on the response rows only). Prints one JSON line.

    python3 scripts/bench_cpu_torch.py MODEL_DIR INPUT.safetensors --threads 2 --runs 3
"""

import argparse
import json
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("input")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(args.threads)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        args.model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    inp = load_file(args.input)
    ids = inp["input_ids"].to(torch.int64)[None]
    pixel_values = inp["pixel_values"]
    grid = inp["image_grid_thw"].to(torch.int64)
    prompt_len = int(inp["prompt_len"][0])
    image_id = model.config.image_token_id
    # transformers 5.x builds M-RoPE positions from mm_token_type_ids; without
    # it the positions silently fall back to 1-D.
    mm = (ids == image_id).to(torch.int64)
    kwargs = dict(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid, mm_token_type_ids=mm)
    targets = ids[0, prompt_len:]

    # The same work as the engine's: the forward stops at the final hidden
    # states (no [T, vocab] logits), and the loss head runs on the response
    # rows only.
    def forward():
        with torch.no_grad():
            model.model(**kwargs)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        hidden = model.model(**kwargs).last_hidden_state[0, prompt_len - 1 : -1]
        logits = model.lm_head(hidden)
        logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum()
        logp.backward()

    def median_seconds(f) -> float:
        f()  # warm-up
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        times.sort()
        return times[len(times) // 2]

    model.train(False)
    fwd = median_seconds(forward)
    fwd_bwd = median_seconds(forward_backward)
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "tokens": ids.shape[1],
                "fwd_s": fwd,
                "fwd_bwd_s": fwd_bwd,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
