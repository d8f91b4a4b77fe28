#!/usr/bin/env python3
"""Merges the kernel bench (benches/kernels.rs) and the torch bench
(scripts/bench_torch.py) JSON lines into ONE table:

    kernel | dtype | shape | ours ms | ours rate | torch ms | torch/ours | % roof

"torch/ours" is torch's median time over ours (> 1: ours is faster); "% roof"
is our achieved TB/s (memory-bound kernels) or TFLOP/s (attention: against
the fp32 CUDA-core peak, since our attention does f32 arithmetic; torch's
tensor-core attention is against the bf16 peak, shown in torch's own
column "torch % roof"). Rows are joined on "id"; a shape that differs
between the two files is flagged with "!". Either file may be missing.

Usage: python3 scripts/bench_table.py bench-kernels.jsonl bench-torch.jsonl
No third-party modules needed.
"""

import json
import math
import sys


def load(path):
    rows = {}
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                rows[r["id"]] = r
    except OSError as e:
        print(f"bench table: {path}: {e.strerror}", file=sys.stderr)
    return rows


def fmt_ms(v):
    if v is None:
        return "-"
    return f"{v:.3f}" if v >= 0.1 else f"{v:.4f}"


def rate(r):
    if r is None:
        return "-"
    if r.get("tflops") is not None:
        return f"{r['tflops']:.1f} TF/s"
    if r.get("tbps") is not None:
        return f"{r['tbps']:.2f} TB/s"
    return "-"


def pct(r):
    if r is None or r.get("pct_roofline") is None:
        return "-"
    return f"{r['pct_roofline']:.0f}%"


def table(ours, torch):
    ids = list(ours) + [i for i in torch if i not in ours]
    head = ["kernel", "dtype", "shape", "ours ms", "ours rate", "torch ms",
            "torch/ours", "% roof", "torch rate", "torch % roof"]
    body, ratios = [], []
    for i in ids:
        o, t = ours.get(i), torch.get(i)
        r = o or t
        shape = r["shape"]
        if o and t and o["shape"] != t["shape"]:
            shape += " !"
        ratio = "-"
        if o and t and o["ms"] > 0:
            q = t["ms"] / o["ms"]
            ratios.append(q)
            ratio = f"{q:.2f}x"
        body.append([r["kernel"], r["dtype"], shape,
                     fmt_ms(o["ms"]) if o else "-", rate(o),
                     fmt_ms(t["ms"]) if t else "-", ratio, pct(o), rate(t), pct(t)])
    widths = [max(len(h), *(len(row[c]) for row in body)) if body else len(h)
              for c, h in enumerate(head)]
    right = {3, 4, 5, 6, 7, 8, 9}

    def line(cells):
        return " | ".join(c.rjust(w) if k in right else c.ljust(w)
                          for k, (c, w) in enumerate(zip(cells, widths)))

    out = [line(head), "-+-".join("-" * w for w in widths)]
    out += [line(row) for row in body]
    dev = next((r.get("device") for r in list(ours.values()) + list(torch.values())), "?")
    tv = next((r.get("torch") for r in torch.values()), None)
    summary = f"{len(ours)} ours, {len(torch)} torch, {len(ratios)} paired on {dev}"
    if tv:
        summary += f" (torch {tv})"
    if ratios:
        geo = math.exp(sum(math.log(q) for q in ratios) / len(ratios))
        faster = sum(q > 1 for q in ratios)
        summary += (f"; torch/ours geometric mean {geo:.2f}x, ours faster on "
                    f"{faster}/{len(ratios)}")
    out.append(summary)
    return "\n".join(out)


def main(argv):
    if len(argv) != 3:
        print(__doc__)
        return 2
    ours, torch = load(argv[1]), load(argv[2])
    if not ours and not torch:
        print("bench table: no results (both benches skipped or failed)")
        return 0
    print(table(ours, torch))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
