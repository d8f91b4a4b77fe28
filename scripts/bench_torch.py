#!/usr/bin/env python3
"""PyTorch equivalents of the CUDA kernels, timed like `benches/kernels.rs`.

Same shapes, same method (one warm-up call, then 5..50 calls sized by
--budget-ms, each preceded by a 256 MiB memset that evicts L2, CUDA events
around each call, median), same JSON-lines schema with "impl": "torch", so
`scripts/bench_table.py` can put every kernel next to its torch equivalent.
The ids (and shape strings) must match the ones in benches/kernels.rs.

Usage (on the GPU machine, PyTorch >= 2.5):

    python3 scripts/bench_torch.py [--out bench-torch.jsonl] [--budget-ms MS]
                                   [--max-seconds S] [FILTER ...]

FILTERs keep the benches whose id contains one of them. Without torch or a
CUDA device it prints a visible SKIP line and exits 0. `--smoke` runs every
equivalent once on the CPU at tiny shapes (checks the script without a GPU:
`.venv-ref/bin/python scripts/bench_torch.py --smoke --out /tmp/smoke.jsonl`).

Equivalents: torch.Tensor.copy_, F.rms_norm (+autograd), HF rotate_half RoPE,
F.silu(g)*u, F.gelu (exact), F.embedding, index_add_, .to(dtype), a
log_softmax + F.kl_div softmax-KL, torch.topk + scatter, log_softmax/gather/
entropy over the full [T, V] logits (+autograd), softmax + torch.multinomial
(HF-style top-p / top-k filtering), torch.optim.AdamW(fused=True), the global
grad norm (get_total_norm / _foreach_norm), the HF Qwen2-VL patchify in
torch, F.scaled_dot_product_attention (flash backend when it accepts the
shape; the backend is in "note") for flash fwd/bwd and for decode against a
contiguous (not paged) KV cache.
"""

import argparse
import json
import math
import sys
import time

VOCAB = 151_936
POOL_MIN, POOL_MAX = -4.0, 4.0
FLUSH_BYTES = 256 << 20
MIN_ITERS, MAX_ITERS = 5, 50
# --smoke: tiny shapes on the CPU, one call each.
SMOKE = False


def big(real, small):
    """The real size, or a tiny one under --smoke."""
    return small if SMOKE else real


def roofline(name):
    """(HBM TB/s, fp32 TFLOP/s, bf16 tensor TFLOP/s) from the device name."""
    n = name.upper()
    if "H200" in n:
        return 4.8, 67.0, 989.0
    if "H100" in n and "PCIE" in n:
        return 2.0, 51.0, 756.0
    if "H100" in n and "NVL" in n:
        return 3.9, 60.0, 835.0
    if "H100" in n:
        return 3.35, 67.0, 989.0
    if "A100" in n:
        return (2.04 if "80GB" in n else 1.56), 19.5, 312.0
    return None


class Bench:
    def __init__(self, torch, args, out):
        self.torch = torch
        self.dev = torch.device("cpu" if SMOKE else "cuda")
        self.name = "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(0)
        self.roof = roofline(self.name)
        self.flush = torch.empty(1 if SMOKE else FLUSH_BYTES, dtype=torch.uint8, device=self.dev)
        self.filters = args.filters
        self.budget_ms = args.budget_ms
        self.deadline = time.time() + args.max_seconds
        self.out = out
        self.ran, self.failed, self.skipped = 0, [], []
        self.gen = torch.Generator(device=self.dev)
        self.gen.manual_seed(0xBE5C)

    def wants(self, kid):
        return not self.filters or any(f in kid for f in self.filters)

    def rand(self, *shape, dtype=None):
        t = self.torch
        x = t.empty(*shape, device=self.dev, dtype=t.float32)
        x.uniform_(POOL_MIN, POOL_MAX, generator=self.gen)
        return x if dtype is None else x.to(dtype)

    def time(self, kid, dtype, shape, fn, *, nbytes=None, flops=None, tensor_core=False, note="",
             also=()):
        """`also`: more ids reported with the same timing (the table pairs
        torch with each of our kernels that does the same op)."""
        if not any(self.wants(i) for i in (kid, *also)):
            return
        if time.time() > self.deadline:
            print(f"SKIP  {kid:<30} --max-seconds reached")
            self.skipped.append(kid)
            return
        t = self.torch
        fn()
        sync(t)
        if SMOKE:
            t0 = time.perf_counter()
            fn()
            ms = [1e3 * (time.perf_counter() - t0)]
            iters = 1
        else:
            ms, iters = self.cuda_times(fn)
        for i in (kid, *also):
            if self.wants(i):
                self.report(i, dtype, shape, ms, iters, nbytes, flops, tensor_core, note)

    def cuda_times(self, fn):
        t = self.torch
        a, b = t.cuda.Event(enable_timing=True), t.cuda.Event(enable_timing=True)
        self.flush.zero_()
        a.record()
        fn()
        b.record()
        b.synchronize()
        probe = max(a.elapsed_time(b), 1e-3)
        iters = int(min(max(self.budget_ms / probe, MIN_ITERS), MAX_ITERS))
        events = [
            (t.cuda.Event(enable_timing=True), t.cuda.Event(enable_timing=True))
            for _ in range(iters)
        ]
        for a, b in events:
            self.flush.zero_()
            a.record()
            fn()
            b.record()
        t.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in events], iters

    def report(self, kid, dtype, shape, ms, iters, nbytes, flops, tensor_core, note):
        t = self.torch
        ms = sorted(ms)
        med = ms[len(ms) // 2]
        secs = med * 1e-3
        tbps = nbytes / secs / 1e12 if nbytes is not None else None
        tflops = flops / secs / 1e12 if flops is not None else None
        if flops is not None:
            rate, unit = tflops, "TFLOP/s"
            roof = None if self.roof is None else (self.roof[2] if tensor_core else self.roof[1])
        else:
            rate, unit = tbps, "TB/s"
            roof = None if self.roof is None else self.roof[0]
        pct = None if roof is None else 100.0 * rate / roof
        print(
            f"{kid:<30} {dtype:<5} {shape:<44} {med:>9.4f} ms {rate:>8.2f} {unit:<7} "
            f"roof {roof if roof is not None else '?'!s:<6} "
            f"{'?' if pct is None else f'{pct:.0f}%':>5} ({iters} iters) {note}"
        )
        line = {
            "id": f"{kid}/{dtype}",
            "kernel": kid,
            "impl": "torch",
            "dtype": dtype,
            "shape": shape,
            "ms": med,
            "ms_min": ms[0],
            "iters": iters,
            "bytes": nbytes,
            "flops": flops,
            "tbps": tbps,
            "tflops": tflops,
            "roofline": roof,
            "unit": unit,
            "pct_roofline": pct,
            "device": self.name,
            "note": note,
            "torch": t.__version__,
        }
        self.out.write(json.dumps(line) + "\n")
        self.out.flush()
        self.ran += 1


def sync(t):
    if not SMOKE:
        t.cuda.synchronize()


def sz(torch, dtype):
    return torch.tensor([], dtype=dtype).element_size()


# ----------------------------------------------------------------- elementwise


def bench_copy(b):
    t = b.torch
    n = big(256 << 20, 1000)
    src = b.rand(n)
    dst = t.empty_like(src)
    b.time("memcpy_dtod", "f32", f"n={n}", lambda: dst.copy_(src), nbytes=2 * n * 4.0,
           note="Tensor.copy_")


def bench_rmsnorm(b):
    t, F = b.torch, b.torch.nn.functional
    if not b.wants("rmsnorm"):
        return
    rows, dim = big(16_384, 8), 3_584
    n = rows * dim
    shape = f"rows={rows} dim={dim}"
    x = b.rand(rows, dim).requires_grad_()
    w = b.rand(dim).requires_grad_()
    dy = b.rand(rows, dim)
    with t.no_grad():
        b.time("rmsnorm_fwd", "f32", shape, lambda: F.rms_norm(x, (dim,), w, 1e-6),
               nbytes=(2 * n + dim + rows) * 4.0, note="F.rms_norm")
    y = F.rms_norm(x, (dim,), w, 1e-6)
    b.time("rmsnorm_bwd", "f32", shape,
           lambda: t.autograd.grad(y, (x, w), dy, retain_graph=True),
           nbytes=(3 * n + 2 * dim + rows) * 4.0, note="autograd of F.rms_norm")


def bench_rope(b):
    t = b.torch
    if not b.wants("rope"):
        return
    tokens, heads, d = big(16_384, 8), 28, 128
    shape = f"tokens={tokens} heads={heads} head_dim={d}"
    inv = 1.0 / (1e6 ** (t.arange(0, d, 2, device=b.dev, dtype=t.float32) / d))
    ang = t.arange(tokens, device=b.dev, dtype=t.float32)[:, None] * inv[None, :]
    emb = t.cat([ang, ang], dim=-1)[:, None, :]

    def rotate_half(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return t.cat((-x2, x1), dim=-1)

    for dtype, name in ((t.float32, "f32"), (t.bfloat16, "bf16")):
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        x = b.rand(tokens, heads, d, dtype=dtype)
        b.time("rope_fwd", name, shape, lambda: x * cos + rotate_half(x) * sin,
               nbytes=2.0 * x.numel() * sz(t, dtype) + tokens * 4.0,
               note="HF apply_rotary_pos_emb (cos/sin tables precomputed)")


def bench_activations(b):
    t, F = b.torch, b.torch.nn.functional
    tokens, inter = big(4_096, 2), 18_944
    n = tokens * inter
    shape = f"n={tokens}x{inter}"
    for dtype, name in ((t.float32, "f32"), (t.bfloat16, "bf16")):
        e = sz(t, dtype)
        if b.wants("swiglu"):
            g = b.rand(n, dtype=dtype).requires_grad_()
            u = b.rand(n, dtype=dtype).requires_grad_()
            with t.no_grad():
                b.time("swiglu_fwd", name, shape, lambda: F.silu(g) * u, nbytes=3.0 * n * e,
                       note="F.silu(g) * u")
            h = F.silu(g) * u
            dh = b.rand(n, dtype=dtype)
            b.time("swiglu_bwd", name, shape,
                   lambda: t.autograd.grad(h, (g, u), dh, retain_graph=True),
                   nbytes=5.0 * n * e, note="autograd")
            del g, u, h, dh
        if b.wants("gelu"):
            x = b.rand(n, dtype=dtype).requires_grad_()
            with t.no_grad():
                b.time("gelu_fwd", name, shape, lambda: F.gelu(x), nbytes=2.0 * n * e,
                       note="F.gelu exact")
            y = F.gelu(x)
            dy = b.rand(n, dtype=dtype)
            b.time("gelu_bwd", name, shape,
                   lambda: t.autograd.grad(y, (x,), dy, retain_graph=True),
                   nbytes=3.0 * n * e, note="autograd")
            del x, y, dy


def bench_embedding(b):
    t, F = b.torch, b.torch.nn.functional
    tokens, dim = big(16_384, 8), big(3_584, 16)
    shape = f"tokens={tokens} vocab={VOCAB} dim={dim}"
    ids = t.randint(0, VOCAB, (tokens,), device=b.dev, generator=b.gen)
    if b.wants("embedding_fwd"):
        table = t.zeros(VOCAB, dim, device=b.dev, dtype=t.bfloat16)
        b.time("embedding_fwd", "bf16", shape, lambda: F.embedding(ids, table),
               nbytes=2.0 * tokens * dim * 2 + tokens * 4.0, note="F.embedding")
        del table
    if b.wants("embedding_bwd"):
        dout = b.rand(tokens, dim)
        dtable = t.zeros(VOCAB, dim, device=b.dev)
        touched = int(t.unique(ids).numel())
        b.time("embedding_bwd", "f32", shape, lambda: dtable.index_add_(0, ids, dout),
               nbytes=tokens * dim * 4.0 + 2.0 * touched * dim * 4.0,
               note="index_add_ (atomics)")


def bench_cast(b):
    t = b.torch
    if not b.wants("cast"):
        return
    n = big(128 << 20, 1000)
    x = b.rand(n)
    b.time("cast_f32_to_bf16", "f32", f"n={n}", lambda: x.to(t.bfloat16), nbytes=n * 6.0,
           note=".to(bfloat16)")
    y = x.to(t.bfloat16)
    b.time("cast_bf16_to_f32", "bf16", f"n={n}", lambda: y.float(), nbytes=n * 6.0,
           note=".float()")


# ------------------------------------------------------------------ loss heads


def bench_kl(b):
    t, F = b.torch, b.torch.nn.functional
    if b.wants("softmax_kl"):
        rows = big(512, 2)
        zp, zq = b.rand(rows, VOCAB), b.rand(rows, VOCAB)

        def kl():
            lp, lq = zp.log_softmax(-1), zq.log_softmax(-1)
            return F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)

        b.time("softmax_kl_fwd", "f32", f"rows={rows} vocab={VOCAB}", kl,
               nbytes=2.0 * rows * VOCAB * 4, note="2x log_softmax + F.kl_div(log_target) + sum")
    if b.wants("dependency_k3"):
        n = big(64 << 20, 1000)
        a, c = b.rand(n), b.rand(n)

        def k3():
            d = (c - a).clamp(-20, 20)
            return (d.exp() - d - 1).clamp(0, 10)

        b.time("dependency_k3", "f32", f"n={n}", k3, nbytes=3.0 * n * 4, note="eager ops")


def bench_topk(b):
    t = b.torch
    if not b.wants("topk_select"):
        return
    rows, length = big(4_096, 4), 4_096
    k = math.ceil(0.4 * length)
    scores = b.rand(rows, length)

    def sel():
        idx = scores.topk(k, dim=-1).indices
        return t.zeros_like(scores).scatter_(1, idx, 1.0)

    b.time("topk_select_mask", "f32", f"rows={rows} len={length} ratio=0.4", sel,
           nbytes=2.0 * rows * length * 4, note="torch.topk + scatter_ (equal lengths)")


def bench_logprob(b):
    t = b.torch
    if not b.wants("logprob"):
        return
    rows, chunk = big(2_048, 2), 16_384
    shape = f"rows={rows} vocab={VOCAB} chunk={chunk}"
    logits = b.rand(rows, VOCAB).requires_grad_()
    tgt = t.randint(0, VOCAB, (rows, 1), device=b.dev, generator=b.gen)

    def fwd():
        lp = logits.log_softmax(-1)
        return lp.gather(1, tgt), -(lp.exp() * lp).sum(-1)

    with t.no_grad():
        b.time("logprob_fwd_chunked", "f32", shape, fwd, nbytes=rows * VOCAB * 4.0,
               note="log_softmax + gather + entropy on the full [T, V] logits")
    tok, ent = fwd()
    dlogp, dent = b.rand(rows, 1), b.rand(rows)
    b.time("logprob_bwd_chunked", "f32", shape,
           lambda: t.autograd.grad((tok, ent), (logits,), (dlogp, dent), retain_graph=True),
           nbytes=2.0 * rows * VOCAB * 4, note="autograd on the full [T, V] logits")


def bench_sampling(b):
    t = b.torch
    if not b.wants("sample"):
        return
    rows = big(256, 2)
    logits = b.rand(rows, VOCAB)
    cols = t.randint(0, VOCAB, (rows, 20), device=b.dev, generator=b.gen)
    peaks = t.empty(rows, 20, device=b.dev).uniform_(10.0, 14.0, generator=b.gen)
    logits.scatter_(1, cols, peaks)
    nbytes = rows * VOCAB * 4.0

    def draw(scores):
        tok = t.multinomial(scores.softmax(-1), 1)
        return tok, logits.log_softmax(-1).gather(1, tok)

    def plain():
        return draw(logits)

    def top_p(temp=0.7, p=0.9):
        s = logits / temp
        srt, idx = t.sort(s, descending=False)
        cum = srt.softmax(-1).cumsum(-1)
        remove = cum <= (1 - p)
        remove[:, -1:] = False
        s = s.masked_fill(remove.scatter(1, idx, remove), -math.inf)
        return draw(s)

    def top_k(temp=0.7, k=50):
        s = logits / temp
        kth = t.topk(s, k)[0][..., -1, None]
        return draw(s.masked_fill(s < kth, -math.inf))

    note = "softmax + torch.multinomial + log_softmax gather (HF-style filters)"
    for kid, fn, (temp, p, k) in (
        ("sample_plain", plain, (1.0, 1.0, 0)),
        ("sample_top_p", top_p, (0.7, 0.9, 0)),
        ("sample_top_k", top_k, (0.7, 1.0, 50)),
    ):
        shape = f"rows={rows} vocab={VOCAB} T={temp:g} top_p={p:g} top_k={k}"  # Rust f32 Display
        b.time(kid, "f32", shape, fn, nbytes=nbytes, note=note)


# ------------------------------------------------------------------- optimizer


def bench_adamw(b):
    t = b.torch
    if not (b.wants("adamw") or b.wants("grad_norm")):
        return
    lens = [big(8 << 20, 1000) if i % 2 == 0 else 3_584 for i in range(16)]
    total = sum(lens)
    shape = f"tensors=16 params={total}"
    params = [t.nn.Parameter(b.rand(n)) for n in lens]
    for p in params:
        p.grad = b.rand(p.numel())
    if b.wants("adamw"):
        note = "torch.optim.AdamW(fused=True) (no bf16 model copy)"
        try:
            opt = t.optim.AdamW(params, lr=1e-6, fused=True)
            opt.step()
        except Exception as e:  # noqa: BLE001 - fall back to foreach
            note = f"torch.optim.AdamW(foreach=True) (fused failed: {type(e).__name__})"
            opt = t.optim.AdamW(params, lr=1e-6, foreach=True)
        b.time("adamw_multi", "f32", shape, opt.step, nbytes=total * (7.0 * 4 + 2), note=note)
    grads = [p.grad for p in params]

    def norm():
        if hasattr(t.nn.utils, "get_total_norm"):
            return t.nn.utils.get_total_norm(grads).item()
        return t.linalg.vector_norm(t.stack(t._foreach_norm(grads))).item()

    b.time("grad_norm", "f32", shape, norm, nbytes=total * 4.0,
           note="get_total_norm/_foreach_norm + .item()")


# ---------------------------------------------------------------------- vision


def bench_patch_embed(b):
    t = b.torch
    if not b.wants("patch_embed"):
        return
    w = h = big(3_584, 56)
    ps, m, tp = 14, 2, 2
    gh, gw = h // ps, w // ps
    patches, features = gh * gw, 3 * tp * ps * ps
    img = t.randint(0, 256, (h, w, 3), device=b.dev, dtype=t.uint8, generator=b.gen)
    mean = t.tensor([0.48145466, 0.4578275, 0.40821073], device=b.dev)[:, None, None]
    std = t.tensor([0.26862954, 0.26130258, 0.27577711], device=b.dev)[:, None, None]
    black = ((0.0 - mean) / std).reshape(3, 1, 1).expand(3, tp, ps * ps).reshape(features)
    black = black.to(t.bfloat16)

    def patchify():
        x = (img.permute(2, 0, 1).float() * (1 / 255) - mean) / std
        x = x.unsqueeze(0).expand(tp, 3, h, w)
        x = x.reshape(1, tp, 3, gh // m, m, ps, gw // m, m, ps)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(patches, features).to(t.bfloat16)
        mask = t.rand(patches, device=b.dev) < 0.5
        return x, t.where(mask[:, None], black, x)

    b.time("patch_embed_masked", "bf16",
           f"image={w}x{h} patches={patches} features={features} p=0.5", patchify,
           nbytes=w * h * 3.0 + 2.0 * patches * features * 2,
           note="HF Qwen2-VL patchify in torch + torch.where masked copy")


# ------------------------------------------------------------------- attention


def sdpa_backends(t):
    """Backends to try, best first: (name, context manager factory)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return [("default", None)]
    return [
        ("flash", lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])),
        ("cudnn", lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])),
        ("efficient", lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])),
        ("default", None),
    ]


def with_backend(t, fn):
    """Wraps fn in the first SDPA backend that runs it: (wrapped, name)."""
    import contextlib

    for name, ctx in sdpa_backends(t):
        def run(ctx=ctx):
            with (ctx() if ctx else contextlib.nullcontext()):
                return fn()
        try:
            run()
            sync(t)
            return run, name
        except Exception:  # noqa: BLE001 - try the next backend
            continue
    raise RuntimeError("no SDPA backend accepted the shape")


def bench_flash(b, name, seqs, length, hq, hkv, d, causal):
    t, F = b.torch, b.torch.nn.functional
    fwd_id, bwd_id = f"flash_fwd_{name}", f"flash_bwd_{name}"
    # Our tensor-core kernels' ids (benches/kernels.rs), paired with the same
    # timing: FA2 (flash_tc_*) and the Hopper forward (flash_wgmma_fwd_*).
    tc_fwd, tc_bwd = f"flash_tc_fwd_{name}", f"flash_tc_bwd_{name}"
    # (Only where attention_fwd takes the wgmma kernel: over 64 queries.)
    wg_fwd = (f"flash_wgmma_fwd_{name}",) if length > 64 else ()
    wg_bwd = (f"flash_wgmma_bwd_{name}",) if length > 64 else ()
    if not any(b.wants(i) for i in (fwd_id, bwd_id, tc_fwd, tc_bwd, *wg_fwd, *wg_bwd)):
        return
    shape = f"seqs={seqs} len={length} hq={hq} hkv={hkv} d={d}" + (" causal" if causal else "")
    pairs = length * (length + 1) // 2 if causal else length * length
    fwd_flops = 4.0 * seqs * pairs * hq * d
    bf = t.bfloat16
    # [B, L, H, D] storage viewed as [B, H, L, D]: the packed layout's order.
    q = b.rand(seqs, length, hq, d, dtype=bf).transpose(1, 2).requires_grad_()
    k = b.rand(seqs, length, hkv, d, dtype=bf).transpose(1, 2).requires_grad_()
    v = b.rand(seqs, length, hkv, d, dtype=bf).transpose(1, 2).requires_grad_()
    gqa = {"enable_gqa": True} if hq != hkv else {}

    def attn():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)

    with t.no_grad():
        run, backend = with_backend(t, attn)
        b.time(fwd_id, "bf16", shape, run, flops=fwd_flops, tensor_core=True,
               note=f"F.scaled_dot_product_attention [{backend}], tensor cores", also=(tc_fwd, *wg_fwd))
    if not any(b.wants(i) for i in (bwd_id, tc_bwd, *wg_bwd)):
        return
    dout = b.rand(seqs, hq, length, d, dtype=bf)
    holder = {}

    def fwd_graph():
        holder["o"] = attn()
        return holder["o"]

    _, backend = with_backend(t, fwd_graph)
    o = holder["o"]
    b.time(bwd_id, "bf16", shape,
           lambda: t.autograd.grad(o, (q, k, v), dout, retain_graph=True),
           flops=2.5 * fwd_flops, tensor_core=True,
           note=f"autograd of SDPA [{backend}], tensor cores", also=(tc_bwd, *wg_bwd))


def bench_attention(b):
    for case in (
        ("vision_full", 4, big(4_096, 32), 16, 16, 80, False),
        ("vision_window", big(256, 2), 64, 16, 16, 80, False),
        ("text_causal", 2, big(4_096, 32), 28, 4, 128, True),
        ("text_causal_8k", 1, big(8_192, 32), 28, 4, 128, True),
        ("text_causal_16k", 1, big(16_384, 32), 28, 4, 128, True),
    ):
        try:
            bench_flash(b, *case)
        except Exception as e:  # noqa: BLE001 - one case fails alone
            print(f"FAIL  flash {case[0]:<24} {type(e).__name__}: {e}")
            b.failed.append(f"flash_{case[0]}")


def bench_paged(b):
    t, F = b.torch, b.torch.nn.functional
    if not (b.wants("paged_decode") or b.wants("paged_decode_tc")):
        return
    batch, ctx, hq, hkv, d, bs = big(64, 2), big(4_096, 64), 28, 4, 128, 16
    bf = t.bfloat16
    q = b.rand(batch, hq, 1, d, dtype=bf)
    k = b.rand(batch, ctx, hkv, d, dtype=bf).transpose(1, 2)
    v = b.rand(batch, ctx, hkv, d, dtype=bf).transpose(1, 2)
    cache = batch * ctx * hkv * d
    with t.no_grad():
        run, backend = with_backend(
            t, lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        b.time("paged_decode", "bf16",
               f"batch={batch} ctx={ctx} hq={hq} hkv={hkv} d={d} block={bs}", run,
               nbytes=2.0 * cache * 2 + 2.0 * batch * hq * d * 2,
               note=f"SDPA [{backend}] on a contiguous (not paged) KV cache",
               also=("paged_decode_tc",))


FAMILIES = [
    ("memcpy", bench_copy),
    ("rmsnorm", bench_rmsnorm),
    ("rope", bench_rope),
    ("activations", bench_activations),
    ("embedding", bench_embedding),
    ("cast", bench_cast),
    ("kl", bench_kl),
    ("topk", bench_topk),
    ("logprob", bench_logprob),
    ("sampling", bench_sampling),
    ("adamw", bench_adamw),
    ("patch_embed", bench_patch_embed),
    ("attention", bench_attention),
    ("paged", bench_paged),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-torch.jsonl")
    ap.add_argument("--budget-ms", type=float, default=400.0)
    ap.add_argument("--max-seconds", type=float, default=180.0)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU, one call each (script check without a GPU)")
    ap.add_argument("filters", nargs="*")
    args = ap.parse_args()
    global SMOKE
    SMOKE = args.smoke
    start = time.time()
    try:
        import torch
    except ImportError as e:
        print(f"bench torch: SKIPPING all {len(FAMILIES)} families: no torch ({e})")
        return 0
    if not SMOKE and not torch.cuda.is_available():
        print(f"bench torch: SKIPPING all {len(FAMILIES)} families: torch sees no CUDA device")
        return 0
    with open(args.out, "w") as out:
        b = Bench(torch, args, out)
        print(f"bench torch {torch.__version__} on {b.name}: roofline {b.roof}; "
              f"median of {MIN_ITERS}..{MAX_ITERS} calls, L2 evicted before each; JSON -> {args.out}")
        for name, fam in FAMILIES:
            try:
                fam(b)
            except Exception as e:  # noqa: BLE001 - one family fails alone
                print(f"FAIL  {name:<30} {type(e).__name__}: {e}")
                b.failed.append(name)
            finally:
                if not SMOKE:
                    torch.cuda.empty_cache()
    print(f"bench torch: {b.ran} timed, {len(b.failed)} failed"
          f"{' (' + ', '.join(b.failed) + ')' if b.failed else ''}, "
          f"{len(b.skipped)} skipped (deadline); {time.time() - start:.0f} s")
    return 1 if b.failed else 0


if __name__ == "__main__":
    sys.exit(main())
