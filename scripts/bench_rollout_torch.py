#!/usr/bin/env python3
"""transformers' `generate` on the shapes of `vppo-engine bench-rollout`.

Random weights (bf16, SDPA attention, static KV cache) at a config.json's
shapes (default: the same tiny model as the Rust bench); B prompts of
--prompt-tokens tokens each with one --image-side image; --new-tokens new
tokens per sample with end-of-sequence suppressed (min_new_tokens), for each
--batch; and the recipe's mix: --mix-prompts prompts x --mix-n samples with
the bench's long-tailed lengths. `generate` has no per-sample stop, so the
mix runs to its longest length and counts only the tokens the lengths ask
for (what static batching delivers). Sampling: temperature 1, top-p 0.99.

One JSON line per case ("impl": "torch", same ids as the Rust bench) to
--out; a readable line per case on stdout. Without torch/transformers it
prints a visible SKIP and exits 0.

    python3 scripts/bench_rollout_torch.py [--config configs/X.json]
        [--prompt-tokens 1024] [--image-side 448] [--new-tokens 512]
        [--batch 64 --batch 256] [--mix-prompts 48] [--mix-n 8]
        [--device cuda|cpu] [--out FILE]
"""

import argparse
import json
import math
import sys
import time

TINY = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "image_token_id": 505,
    "video_token_id": 506,
    "vision_start_token_id": 503,
    "vision_end_token_id": 504,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "vision_config": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_heads": 2,
        "in_chans": 3,
        "out_hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
        "hidden_act": "silu",
    },
}


def mix_lengths(count, most):
    """The Rust bench's lengths: Pareto(1.5) quantiles of scale most/8 at
    frac(0.5 + 0.618034 k), rounded half away from zero, in [1, most]."""
    out = []
    for k in range(count):
        u = math.fmod(0.5 + k * 0.618034, 1.0)
        x = (most / 8.0) / (1.0 - u) ** (1.0 / 1.5)
        out.append(min(max(int(math.floor(x + 0.5)), 1), most))
    return out


def get(cfg, key):
    return cfg.get(key, cfg.get("text_config", {}).get(key))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--image-side", type=int, default=448)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--mix-prompts", type=int, default=48)
    ap.add_argument("--mix-n", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out")
    args = ap.parse_args()
    batches = args.batch or [64, 256]
    try:
        import torch
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    except ImportError as e:
        print(f"SKIP  bench_rollout_torch: {e}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIP  bench_rollout_torch: no CUDA device")
        return 0
    if args.config:
        with open(args.config) as f:
            raw = json.load(f)
    else:
        raw = dict(TINY)
    cfg = Qwen2_5_VLConfig(**raw)
    cfg._attn_implementation = "sdpa"
    dev = torch.device(args.device)
    t0 = time.time()
    with dev:
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            cfg, attn_implementation="sdpa", dtype=torch.bfloat16
        )
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"bench_rollout_torch: {args.config or 'tiny model'} ({n_params / 1e9:.2f}B parameters, "
        f"init {time.time() - t0:.1f} s), bf16, sdpa, static cache, {args.device}"
    )

    vc = raw["vision_config"]
    patch, merge, tp = vc["patch_size"], vc["spatial_merge_size"], vc.get("temporal_patch_size", 2)
    side = args.image_side
    grid = side // patch
    image_tokens = (side // (patch * merge)) ** 2
    image_id = get(raw, "image_token_id")
    start_id, end_id = get(raw, "vision_start_token_id"), get(raw, "vision_end_token_id")
    vocab = get(raw, "vocab_size")
    special = {image_id, start_id, end_id, get(raw, "video_token_id")}
    patch_dim = 3 * tp * patch * patch

    def prompts(count):
        gen = torch.Generator().manual_seed(1)
        rows = []
        for _ in range(count):
            ids = [start_id] + [image_id] * image_tokens + [end_id] if side else []
            text = torch.randint(0, vocab, (args.prompt_tokens - len(ids) + 8,), generator=gen).tolist()
            ids += [t for t in text if t not in special][: args.prompt_tokens - len(ids)]
            rows.append(ids)
        ids = torch.tensor(rows, device=dev)
        extra = {}
        if side:
            extra["pixel_values"] = torch.rand(count * grid * grid, patch_dim, generator=gen).to(
                dev, torch.bfloat16
            )
            extra["image_grid_thw"] = torch.tensor([[1, grid, grid]] * count, device=dev)
        return ids, extra

    cases = [(f"rollout batch {b}", b, 1, [args.new_tokens] * b) for b in batches]
    if args.mix_prompts > 0:
        cases.append(
            (
                f"rollout mix {args.mix_prompts}x{args.mix_n}",
                args.mix_prompts,
                args.mix_n,
                mix_lengths(args.mix_prompts * args.mix_n, args.new_tokens),
            )
        )
    out = open(args.out, "w") if args.out else None
    for name, count, n, lengths in cases:
        ids, extra = prompts(count)
        longest = max(lengths)
        kw = dict(
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=True,
            temperature=1.0,
            top_p=0.99,
            top_k=0,
            num_return_sequences=n,
            cache_implementation="static",
            pad_token_id=0,
        )
        with torch.inference_mode():
            # Warm-up on a 2-token generation (kernels, allocator).
            model.generate(input_ids=ids[:1], **{k: v[: grid * grid] if k == "pixel_values" else v[:1] for k, v in extra.items()},
                           **{**kw, "max_new_tokens": 2, "min_new_tokens": 2, "num_return_sequences": 1})
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.time()
            res = model.generate(input_ids=ids, **extra, **kw)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.time() - t
        made = (res.shape[1] - ids.shape[1]) * res.shape[0]
        assert res.shape[0] == count * n and made >= sum(lengths), (res.shape, sum(lengths))
        useful = sum(lengths)
        row = {
            "id": name,
            "impl": "torch",
            "sequences": count * n,
            "prompt_tokens": args.prompt_tokens,
            "output_tokens": useful,
            "generated_tokens": made,
            "seconds": seconds,
            "tokens_per_s": useful / seconds,
        }
        print(
            f"{name}: {count * n} sequences, {useful} output tokens ({made} generated, padded to "
            f"the longest) in {seconds:.2f} s: {useful / seconds:.1f} tokens/s"
        )
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
