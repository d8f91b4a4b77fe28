#!/usr/bin/env python3
"""PyTorch's side of `vppo-engine bench`: one training step of a Qwen2.5-VL
of the same published shapes, on the same micro-batch, printed the same way.

transformers' Qwen2_5_VLForConditionalGeneration with random weights from
the config.json (fp32 weights), AMP bf16 autocast, SDPA attention, gradient
checkpointing (non-reentrant, decoder and vision tower), fused AdamW. The
micro-batch: --seqs sequences of --seq-len tokens (the last --response-len
the response), each prompt with one --image-side square image, token ids
built by the same formula as the engine's bench (src/model_bench.rs); no
padding (equal lengths). Loss: minus the mean log-prob of the response
tokens, logits taken on the response rows only (as the engine does).

Model FLOPs as shared/docs/perf.md and src/model_bench.rs define them (3 x
the forward's matmul FLOPs over the rows each weight multiplies, plus 3 x
the attention FLOPs over visible pairs; recompute not counted), computed
here from the config by formula.

    python3 scripts/bench_model_torch.py --config configs/models/qwen2.5-vl-3b \
        [--seqs 16 --seq-len 1024 --response-len 512 --image-side 448] \
        [--steps 3 --warmup 1] [--no-optimizer] [--no-recompute] \
        [--peak-tflops 989] [--device cuda|cpu] [--json]

Without torch/transformers, or with --device cuda and no GPU, it prints a
visible SKIP line and exits 0. On the CPU it runs (slowly) at any shape,
which is how the script is checked without a GPU.
"""

import argparse
import json
import os
import statistics
import sys
import time


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="config.json or a directory holding one")
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--response-len", type=int, default=512)
    p.add_argument("--image-side", type=int, default=448)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-optimizer", action="store_true")
    p.add_argument("--no-recompute", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def known_peak_tflops(name):
    n = name.upper()
    if "H100" in n or "H200" in n:
        return 989.0
    if "A100" in n:
        return 312.0
    return None


def hash_unit(tensor, j):
    h = ((j ^ (tensor << 40)) * 0x9E3779B97F4A7C15) % (1 << 64) >> 40
    return 2.0 * (h / float(1 << 24)) - 1.0


def synthetic_batch(cfg, a):
    """Token ids as src/model_bench.rs builds them; pixels random."""
    vc = cfg.vision_config
    unit = vc.patch_size * vc.spatial_merge_size
    if a.image_side <= 0 or a.image_side % unit:
        sys.exit(f"--image-side {a.image_side} must be a positive multiple of {unit}")
    grid = a.image_side // vc.patch_size
    patches = grid * grid
    image_tokens = patches // (vc.spatial_merge_size ** 2)
    prompt_len = a.seq_len - a.response_len
    lead = 4
    if a.seqs < 1 or a.response_len < 1 or prompt_len < lead + image_tokens + 3:
        sys.exit(f"a {prompt_len}-token prompt cannot hold {image_tokens} image tokens + {lead + 3}")
    specials = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]
    vocab = cfg.text_config.vocab_size if hasattr(cfg, "text_config") else cfg.vocab_size
    ceiling = max(1, min(min(specials), vocab))
    ids = []
    for seq in range(a.seqs):
        def text(i):
            return (i * 7919 + seq * 104729) % ceiling
        row = [text(i) for i in range(lead)]
        row.append(cfg.vision_start_token_id)
        row += [cfg.image_token_id] * image_tokens
        row.append(cfg.vision_end_token_id)
        row += [text(i) for i in range(len(row), a.seq_len)]
        ids.append(row)
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    return ids, prompt_len, grid, patches, patch_dim


def model_flops(cfg, a, grid, prompt_len):
    """perf.md's model FLOPs of one training step, from the config."""
    tc = cfg.text_config if hasattr(cfg, "text_config") else cfg
    vc = cfg.vision_config
    h, inter, layers = tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers
    heads, kv = tc.num_attention_heads, tc.num_key_value_heads
    hd = getattr(tc, "head_dim", None) or h // heads
    q, kvw = heads * hd, kv * hd
    tokens = a.seqs * a.seq_len
    scored = a.seqs * (a.seq_len - prompt_len)
    patches = a.seqs * grid * grid
    unit = vc.spatial_merge_size ** 2
    image_tokens = patches // unit
    vh, vi = vc.hidden_size, vc.intermediate_size
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    merged = vh * unit
    text_layer = h * (q + 2 * kvw) + q * h + 3 * h * inter
    vision_block = 3 * vh * vh + vh * vh + 3 * vh * vi
    matmul = 2.0 * (layers * text_layer * tokens + tc.vocab_size * h * scored
                    + (vc.depth * vision_block + vh * patch_dim) * patches
                    + (merged * merged + vc.out_hidden_size * merged) * image_tokens)
    causal = a.seqs * a.seq_len * (a.seq_len + 1) / 2
    text_attn = 4.0 * hd * heads * layers * causal
    # Windows of window_size px (window_size / patch_size patches a side),
    # clipped at the image edge; full-attention blocks see the whole image.
    wp = vc.window_size // vc.patch_size
    sides = [min(wp, grid - s) for s in range(0, grid, wp)]
    window_pairs = a.seqs * sum((r * c) ** 2 for r in sides for c in sides)
    full_pairs = a.seqs * (grid * grid) ** 2
    full_blocks = len([i for i in range(vc.depth) if i in vc.fullatt_block_indexes])
    vhd = vh // vc.num_heads
    vision_attn = 4.0 * vhd * vc.num_heads * (full_blocks * full_pairs + (vc.depth - full_blocks) * window_pairs)
    return 3.0 * (matmul + text_attn + vision_attn)


def main():
    a = parse()
    try:
        import torch
        from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration
    except Exception as e:  # noqa: BLE001
        print(f"SKIP bench_model_torch: {e}")
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        print("SKIP bench_model_torch: no CUDA device")
        return 0
    path = a.config if os.path.isdir(a.config) else os.path.dirname(os.path.abspath(a.config))
    cfg = AutoConfig.from_pretrained(path)
    ids, prompt_len, grid, patches, patch_dim = synthetic_batch(cfg, a)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with dev:
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            cfg, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    if not a.no_recompute:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    params = sum(p.numel() for p in model.parameters())
    note = ""
    opt = None
    if not a.no_optimizer:
        try:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01, fused=True)
        except Exception as e:  # noqa: BLE001
            note = f" (fused AdamW refused on {a.device}: {e}; foreach instead)"
            opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01, foreach=True)
    name = torch.cuda.get_device_name(dev) if a.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"torch model-step bench: {a.config}: {params / 1e9:.2f}B parameters, random weights "
          f"({time.perf_counter() - t0:.1f} s), {name}; {a.seqs} x {a.seq_len} tokens ({a.response_len} response), "
          f"one {a.image_side}x{a.image_side} image each; AMP bf16, SDPA, recompute "
          f"{'off' if a.no_recompute else 'on'}, fused AdamW {'off' if a.no_optimizer else 'on'}{note}",
          file=sys.stderr)
    input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
    pixel_values = torch.rand(a.seqs * patches, patch_dim, device=dev) * 2 - 1
    grid_thw = torch.tensor([[1, grid, grid]] * a.seqs, dtype=torch.long, device=dev)
    attention_mask = torch.ones_like(input_ids)
    targets = input_ids[:, prompt_len:]

    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize()

    steps, fwd_bwd, adamw = [], [], []
    mean_lp = float("nan")
    for step in range(a.warmup + a.steps):
        if step == a.warmup and a.device == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats(dev)
        sync()
        start = time.perf_counter()
        with torch.autocast(device_type=a.device, dtype=torch.bfloat16):
            out = model.model(input_ids=input_ids, attention_mask=attention_mask,
                              pixel_values=pixel_values, image_grid_thw=grid_thw, use_cache=False)
            rows = out.last_hidden_state[:, prompt_len - 1:-1]
            logits = model.lm_head(rows)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        loss = -logp.mean()
        loss.backward()
        sync()
        t_fb = time.perf_counter() - start
        t_opt = None
        if opt is not None:
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            t_opt = time.perf_counter() - t1
        else:
            model.zero_grad(set_to_none=True)
        mean_lp = float(logp.detach().mean())
        tag = " (warm-up)" if step < a.warmup else ""
        extra = f", AdamW {t_opt:.3f} s" if t_opt is not None else ""
        print(f"step {step + 1}{tag}: forward + backward {t_fb:.3f} s{extra}", file=sys.stderr)
        if step >= a.warmup:
            steps.append(t_fb + (t_opt or 0.0))
            fwd_bwd.append(t_fb)
            if t_opt is not None:
                adamw.append(t_opt)
    tokens = a.seqs * a.seq_len
    step_s = statistics.median(steps)
    flops = model_flops(cfg, a, grid, prompt_len)
    peak = a.peak_tflops or (known_peak_tflops(name) if a.device == "cuda" else None)
    tflops = flops / step_s / 1e12
    mfu = tflops / peak if peak else None
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if a.device == "cuda" else None
    mfu_s = f"MFU {100 * mfu:.1f}% of {peak:.0f} TFLOP/s" if mfu is not None else "MFU n/a (no --peak-tflops)"
    mem_s = f"peak device memory {mem:.2f} GiB" if mem is not None else "peak device memory n/a (host)"
    opt_s = f", AdamW {statistics.median(adamw):.3f} s" if adamw else ""
    print(f"torch: {tokens / step_s:.0f} tokens/s (step {step_s:.3f} s: forward + backward "
          f"{statistics.median(fwd_bwd):.3f} s{opt_s}), {flops / 1e12:.1f} model TFLOP/step, "
          f"{tflops:.1f} TFLOP/s, {mfu_s}, {mem_s}; mean response log-prob {mean_lp:.3f}")
    if a.json:
        print(json.dumps({
            "bench": "model_step", "impl": "torch", "model": a.config, "device": name,
            "params": params, "tokens": tokens, "image_tokens": a.seqs * patches // cfg.vision_config.spatial_merge_size ** 2,
            "response_tokens": a.seqs * a.response_len, "step_s": step_s,
            "fwd_bwd_s": statistics.median(fwd_bwd),
            "optimizer_s": statistics.median(adamw) if adamw else None,
            "tokens_per_s": tokens / step_s, "model_tflop": flops / 1e12, "tflops": tflops,
            "mfu": mfu, "peak_memory_gib": mem,
        }, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
