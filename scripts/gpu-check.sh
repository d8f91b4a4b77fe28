#!/usr/bin/env bash
# The one prepared GPU check (shared/docs/gpu.md): build here, carry the
# binaries, run there, print one table.
#
#   scripts/gpu-check.sh build   # here (no GPU): release binaries -> gpu-bundle/
#   scripts/gpu-check.sh run     # on the GPU machine (no cargo, no network)
#
# With the device tool: run `scripts/gpu-check.sh build` locally, then
# `bash scripts/gpu-check.sh run` there with carry ["gpu-bundle"].
#
# build: the release `vppo-engine`, the shaders-test binary and the kernel
#   bench (benches/kernels.rs), stripped and gzipped (`run` unpacks them),
#   plus the torch bench scripts; fails if the bundle exceeds 64 MiB. Uses $NVCC
#   when set (else installs the pinned toolchain); CARGO_BUILD_JOBS=1 for a
#   shared machine.
# run: device/driver/clocks, `vppo-engine info`, shaders-test (every kernel vs
#   its CPU twin; NCCL collectives at world size 1), the tensor-core attention benches beside torch SDPA (own
#   table) with compute-sanitizer racecheck + synccheck of those kernels'
#   small cases, the kernel benches, the PyTorch equivalents, a bounded
#   compute-sanitizer memcheck of the small cases, the generic model graph
#   on the CUDA backend vs the CPU backend (forward, training step, dual
#   pass, generation, bf16 vs its CPU twin), `train --device cuda` vs cpu on
#   the built-in task (fp32) and in bf16, the rollout bench (`vppo-engine
#   bench-rollout` at 7B, else 3B, from configs/, vs transformers `generate`
#   on the same shapes), a summary of the checks, then the merged table
#   (ours vs torch, % of roofline) LAST. Every step has a timeout; the whole
#   run stays under 8 minutes. JSON lines, the log and the table go to
#   $OUT (the device tool brings it back) or gpu-bundle/results/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bundle=gpu-bundle
max_bundle_mib=64

# The path of one cargo test/bench executable from --message-format=json.
artifact() {
  python3 -c 'import json,sys
name = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == name:
        print(m["executable"])' "$1"
}

case "${1:-}" in
  build)
    export VPPO_REQUIRE_KERNELS=1
    if [ -z "${NVCC:-}" ] || [ ! -x "${NVCC}" ]; then
      bash scripts/install-cuda-toolchain.sh >/dev/null
    fi
    rm -rf "$bundle"
    mkdir -p "$bundle"
    cargo build --release --bin vppo-engine
    cp "${CARGO_TARGET_DIR:-target}/release/vppo-engine" "$bundle/"
    shaders_bin=$(cargo test --release --test shaders --no-run --message-format=json 2>/dev/null | artifact shaders)
    cp "$shaders_bin" "$bundle/shaders"
    bench_bin=$(cargo bench --bench kernels --no-run --message-format=json 2>/dev/null | artifact kernels)
    cp "$bench_bin" "$bundle/bench-kernels"
    strip "$bundle/vppo-engine" "$bundle/shaders" "$bundle/bench-kernels"
    # The binaries travel gzipped (a third of their size: each embeds every
    # fatbin) and `run` unpacks them; the carry limit is on what travels.
    tar -C "$bundle" -czf "$bundle/bins.tar.gz" vppo-engine shaders bench-kernels
    rm "$bundle/vppo-engine" "$bundle/shaders" "$bundle/bench-kernels"
    cp scripts/bench_torch.py scripts/bench_table.py scripts/bench_rollout_torch.py scripts/bench_model_torch.py "$bundle/"
    du -sh "$bundle"
    size_kib=$(du -sk "$bundle" | cut -f1)
    if [ "$size_kib" -gt $((max_bundle_mib * 1024)) ]; then
      echo "gpu-bundle is $((size_kib / 1024)) MiB: over the ${max_bundle_mib} MiB that may travel" >&2
      exit 1
    fi
    ;;
  run)
    start=$SECONDS
    if [ -f "$bundle/bins.tar.gz" ]; then
      tar -C "$bundle" -xzf "$bundle/bins.tar.gz"
    fi
    total_budget=${GPU_CHECK_BUDGET:-470} # seconds, under the 8-minute promise
    results=${OUT:-$bundle/results}
    mkdir -p "$results"
    log="$results/gpu-check.log"
    ours="$results/bench-kernels.jsonl"
    theirs="$results/bench-torch.jsonl"
    : >"$ours"
    : >"$theirs"
    left() { echo $((total_budget - (SECONDS - start))); }
    step() { echo; echo "=== $* (t=$((SECONDS - start)) s)"; }
    {
      step "device"
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.total,power.limit --format=csv || true
      step "vppo-engine info"
      timeout 30 "$bundle/vppo-engine" info || echo "info: rc $?"
      # NCCL (the nccl case of shaders-test) comes with torch's wheels; put
      # its library where cudarc's loader looks.
      nccl_dir=$(python3 -c 'import glob, site, os
for d in site.getsitepackages():
    for f in glob.glob(os.path.join(d, "nvidia", "nccl", "lib", "libnccl.so*")):
        print(os.path.dirname(f)); raise SystemExit' 2>/dev/null || true)
      if [ -n "$nccl_dir" ]; then
        # cudarc asks for libnccl.so (or .so.<cuda major>); wheels ship .so.2.
        mkdir -p "$bundle/nccl-lib"
        ln -sf "$nccl_dir/libnccl.so.2" "$bundle/nccl-lib/libnccl.so"
        export LD_LIBRARY_PATH="$bundle/nccl-lib:$nccl_dir:${LD_LIBRARY_PATH:-}"
      fi
      echo "NCCL library: ${nccl_dir:-system default}"
      step "shaders-test (kernels vs CPU twins, NCCL at world size 1)"
      timeout 120 "$bundle/shaders" || echo "shaders: FAILED or timed out (rc $?)"
      # ---- tensor-core attention (issue 14): flash_attn_tc fwd/bwd, the
      # ---- Hopper forward flash_attn_wgmma (TMA + wgmma) and paged_attn_tc
      # ---- against torch SDPA in the same run (same ids), then racecheck +
      # ---- synccheck of their small cases (cp.async into double-buffered
      # ---- shared memory, TMA into the mbarrier-guarded ring: where races hide).
      step "tensor-core attention benches: ours (flash_tc_*, flash_wgmma_fwd_*, flash_wgmma_bwd_*, paged_decode_tc) vs torch SDPA"
      attn_ours="$results/bench-attn-kernels.jsonl"
      attn_theirs="$results/bench-attn-torch.jsonl"
      timeout 75 "$bundle/bench-kernels" --out "$attn_ours" --max-seconds 50 flash_tc flash_wgmma paged_decode ||
        echo "bench-kernels (attention): FAILED or timed out (rc $?)"
      timeout 100 python3 "$bundle/bench_torch.py" --out "$attn_theirs" --max-seconds 70 flash_ paged_decode ||
        echo "bench_torch (attention): FAILED or timed out (rc $?)"
      python3 "$bundle/bench_table.py" "$attn_ours" "$attn_theirs" | tee "$results/table-attention.txt" || true
      tc_cases=("flash_attn_tc fwd+bwd q=[1] " "flash_attn_tc fwd+bwd q=[200, 9]" "flash_attn_tc fwd+bwd q=[7, 40]"
        "flash_attn_tc fwd+bwd q=[64, 48]" "paged_attn_tc lens=[1] " "paged_attn_tc lens=[17, 300, 64]"
        "paged_attn_tc lens=[93, 2]" "flash_attn_wgmma fwd q=[200, 9]" "flash_attn_wgmma fwd q=[3, 140]"
        "flash_attn_wgmma fwd q=[70, 0, 145]" "flash_attn_wgmma fwd q=[257]"
        "flash_attn_wgmma bwd q=[200, 9]" "flash_attn_wgmma bwd q=[3, 140]"
        "flash_attn_wgmma bwd q=[70, 0, 145]" "flash_attn_wgmma bwd q=[257]")
      if command -v compute-sanitizer >/dev/null; then
        step "compute-sanitizer racecheck of the tensor-core attention kernels (small cases)"
        timeout 100 compute-sanitizer --tool racecheck --error-exitcode 3 --print-limit 20 \
          "$bundle/shaders" "${tc_cases[@]}" || echo "compute-sanitizer: racecheck FAILED or timed out (rc $?)"
        step "compute-sanitizer synccheck of the tensor-core attention kernels (small cases)"
        timeout 60 compute-sanitizer --tool synccheck --error-exitcode 3 --print-limit 20 \
          "$bundle/shaders" "${tc_cases[@]}" || echo "compute-sanitizer: synccheck FAILED or timed out (rc $?)"
      else
        step "racecheck/synccheck: compute-sanitizer not on PATH, skipped"
      fi
      # ---- the graph on CUDA: GEMMs, the generic graph's forward, training
      # ---- step, dual pass and generator vs the CPU backend, and
      # ---- `score --device cuda` vs the CPU on a fixture. Self-contained.
      # cuBLAS: if the loader cannot find libcublasLt, use the CUDA toolkit's
      # or the pip wheels' (next to PyTorch) library directory.
      if ! ldconfig -p 2>/dev/null | grep -q 'libcublasLt\.so'; then
        cublas_dir=$(python3 - 2>/dev/null <<'PY' || true
import glob, os, site
roots = ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
roots += [os.path.join(r, "nvidia") for r in site.getsitepackages() + [site.getusersitepackages()]]
for r in roots:
    hits = sorted(glob.glob(os.path.join(r, "**", "libcublasLt.so*"), recursive=True))
    if hits:
        print(os.path.dirname(hits[0]))
        break
PY
  )
        if [ -n "$cublas_dir" ]; then
          export LD_LIBRARY_PATH="$cublas_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
          echo "cuBLAS from $cublas_dir"
        fi
      fi
      step "cuBLAS GEMMs + the generic graph on CUDA vs CPU (forward, training step, dual pass, generate), score --device cuda vs cpu"
      timeout 120 "$bundle/shaders" "gemm " "graph " "generate " ||
        echo "shaders gemm + graph on CUDA: FAILED (rc $?)"
      fx=tests/fixtures/qwen2_5_vl/single_noresize
      response=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["response"])' "$fx/inputs.json")
      prompt="<image>What is shown in the image? Describe the picture."
      score_dir=$(mktemp -d)
      for dev in cpu cuda; do
        timeout 40 "$bundle/vppo-engine" score --model "$fx" --image "$fx/img0.png" --prompt "$prompt" \
          --response "$response" --device "$dev" --out "$score_dir/$dev.safetensors" ||
          echo "score --device $dev: exited with $?"
      done
      python3 - "$score_dir" <<'PY' || true
import json, os, struct, sys
def logprobs(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(n))["response_logprobs"]
        f.seek(8 + n + meta["data_offsets"][0])
        raw = f.read(meta["data_offsets"][1] - meta["data_offsets"][0])
    return struct.unpack("<%df" % (len(raw) // 4), raw)
d = sys.argv[1]
try:
    cpu, gpu = logprobs(os.path.join(d, "cpu.safetensors")), logprobs(os.path.join(d, "cuda.safetensors"))
    diff = max(abs(a - b) for a, b in zip(cpu, gpu)) if len(cpu) == len(gpu) else float("inf")
    ok = diff <= 5e-2 and diff == diff
    print("score --device cuda vs cpu (single_noresize, %d tokens): %s max |dlogp| %.3e (tol 5e-2)"
          % (len(cpu), "PASS" if ok else "FAIL", diff))
except Exception as e:
    print("score --device cuda vs cpu (single_noresize): FAIL (%s)" % e)
PY
      rm -rf "$score_dir"
      # ---- device generation (branch gpu-generate): greedy `generate --device
      # ---- cuda` vs cpu on a fixture, token ids identical. Self-contained.
      gfx=tests/fixtures/qwen2_5_vl/single_noresize
      gen_dir=$(mktemp -d)
      step "generate --device cuda vs cpu (greedy)"
      for dev in cpu cuda; do
        timeout 60 "$bundle/vppo-engine" generate --model "$gfx" --image "$gfx/img0.png" \
          --prompt "<image>What is shown in the image? Describe the picture." \
          --n 2 --temperature 0 --max-new-tokens 24 --device "$dev" >"$gen_dir/$dev.jsonl" ||
          echo "generate --device $dev: exited with $?"
      done
      python3 - "$gen_dir" <<'PY' || true
import json, os, sys
d = sys.argv[1]
try:
    cpu, gpu = ([json.loads(l) for l in open(os.path.join(d, f + ".jsonl")) if l.strip()] for f in ("cpu", "cuda"))
    same = len(cpu) == len(gpu) > 0 and all(a["token_ids"] == b["token_ids"] for a, b in zip(cpu, gpu))
    diff = max((abs(x - y) for a, b in zip(cpu, gpu) for x, y in zip(a["logprobs"], b["logprobs"])), default=float("inf"))
    ok = same and diff <= 1e-3
    print("generate --device cuda vs cpu greedy (single_noresize, %d samples): %s ids %s, max |dlogp| %.3e (tol 1e-3)"
          % (len(cpu), "PASS" if ok else "FAIL", "identical" if same else "DIFFER", diff))
except Exception as e:
    print("generate --device cuda vs cpu greedy (single_noresize): FAIL (%s)" % e)
PY
      rm -rf "$gen_dir"
      # ---- one VPPO training run on the built-in task, CPU vs CUDA: same
      # ---- warm-up (CPU), then a few RL steps each; wall time and metrics.
      step "train --device cuda vs cpu (built-in task, 60 warm-up + 16 RL steps; fp32 both, then bf16 on cuda)"
      train_dir=$(mktemp -d)
      for run in cpu:fp32 cuda:fp32 cuda:bf16; do
        dev=${run%%:*} precision=${run##*:}
        name=$dev; [ "$precision" = bf16 ] && name=cuda-bf16
        t0=$SECONDS
        timeout 90 "$bundle/vppo-engine" train --out "$train_dir/$name" --device "$dev" \
          max_steps=16 precision=$precision 2>&1 | grep -avE "^step " | tail -n 4 ||
          echo "train --device $dev precision=$precision: exited with $?"
        echo "train --device $dev precision=$precision: $((SECONDS - t0)) s wall (warm-up included)"
      done
      python3 - "$train_dir" <<'PY' || true
import json, os, sys
d = sys.argv[1]
def metrics(dev):
    with open(os.path.join(d, dev, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]
try:
    cpu, gpu = metrics("cpu"), metrics("cuda")
    for name, m in (("cpu", cpu), ("cuda", gpu)):
        print("train --device %-4s: %d steps, step 1 loss %.6f reward %.3f, last reward %.3f, mean step %.3f s"
              % (name, len(m), m[0]["loss"], m[0]["reward_mean"], m[-1]["reward_mean"],
                 sum(x["step_time_s"] for x in m) / len(m)))
    same_batch = cpu[0]["reward_mean"] == gpu[0]["reward_mean"] and cpu[0]["response_len_mean"] == gpu[0]["response_len_mean"]
    dl = abs(cpu[0]["loss"] - gpu[0]["loss"])
    print("train --device cuda vs cpu, step 1: %s |dloss| %.3e (tol 1e-2; same rollouts: %s)"
          % ("PASS" if len(gpu) == len(cpu) and (dl <= 1e-2 or not same_batch) else "FAIL", dl, same_batch))
except Exception as e:
    print("train --device cuda vs cpu: FAIL (%s)" % e)
try:
    m = metrics("cuda-bf16")
    finite = all(x["loss"] == x["loss"] and abs(x["loss"]) < 1e3 for x in m)
    print("train --device cuda precision=bf16: %s %d steps, first reward %.3f, last %.3f, mean step %.3f s"
          % ("PASS" if len(m) == 16 and finite else "FAIL", len(m), m[0]["reward_mean"],
             m[-1]["reward_mean"], sum(x["step_time_s"] for x in m) / len(m)))
except Exception as e:
    print("train --device cuda precision=bf16: FAIL (%s)" % e)
PY
      rm -rf "$train_dir"
      # ---- the model-level bench: one training step at published shapes
      # ---- (configs/models/, random weights), `vppo-engine bench` vs
      # ---- scripts/bench_model_torch.py (AMP bf16, SDPA, checkpointing,
      # ---- fused AdamW) in the same window, side by side with the ratio of
      # ---- tokens/s. 3B: the whole step; 7B: forward + backward (fp32 AdamW
      # ---- state of 8.3B parameters does not fit beside it).
      # ---- GPU_CHECK_MODELS="3b 7b" picks; each is skipped visibly when the
      # ---- budget is short.
      models_jsonl="$results/bench-model.jsonl"
      : >"$models_jsonl"
      for size in ${GPU_CHECK_MODELS:-3b 7b}; do
        case "$size" in
          3b) extra=(); need=200 ;;
          7b) extra=(--no-optimizer); need=260 ;;
          *) echo "model bench: unknown size $size (3b or 7b)"; continue ;;
        esac
        if [ "$(left)" -lt "$need" ]; then
          step "model bench qwen2.5-vl-$size: skipped (only $(left) s left, needs $need)"
          continue
        fi
        cfg=configs/models/qwen2.5-vl-$size
        step "model bench qwen2.5-vl-$size: 16 x 1024 tokens, one 448x448 image each, recompute ${extra[*]:-+ AdamW}"
        per=$(($(left) / 3))
        [ "$per" -gt 150 ] && per=150
        timeout "$per" "$bundle/vppo-engine" bench --model "$cfg" --device cuda --steps 2 --warmup 1 \
          --json "${extra[@]}" | tee -a "$models_jsonl.tmp" || echo "vppo-engine bench $size: FAILED or timed out (rc $?)"
        timeout "$per" python3 "$bundle/bench_model_torch.py" --config "$cfg" --device cuda --steps 3 --warmup 1 \
          --json "${extra[@]}" | tee -a "$models_jsonl.tmp" || echo "bench_model_torch $size: FAILED or timed out (rc $?)"
        grep -a '^{' "$models_jsonl.tmp" >>"$models_jsonl" || true
        rm -f "$models_jsonl.tmp"
      done
      python3 - "$models_jsonl" <<'PY' || true
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault(r["model"].rstrip("/").split("/")[-1], {})[r["impl"]] = r
print("model step (16 x 1024 tokens): ours vs torch")
print("%-16s %-12s %10s %8s %8s %9s" % ("model", "impl", "tokens/s", "MFU", "step s", "peak GiB"))
for m, d in sorted(by.items()):
    for impl in ("vppo-engine", "torch"):
        r = d.get(impl)
        if r:
            mfu = "%.1f%%" % (100 * r["mfu"]) if r.get("mfu") is not None else "n/a"
            mem = "%.1f" % r["peak_memory_gib"] if r.get("peak_memory_gib") is not None else "n/a"
            print("%-16s %-12s %10.0f %8s %8.3f %9s" % (m, impl, r["tokens_per_s"], mfu, r["step_s"], mem))
    if "vppo-engine" in d and "torch" in d:
        print("%-16s ours/torch tokens/s: %.2f" % (m, d["vppo-engine"]["tokens_per_s"] / d["torch"]["tokens_per_s"]))
PY
      step "kernel benches"
      bench_s=$(($(left) / 4))
      [ "$bench_s" -gt 100 ] && bench_s=100
      [ "$bench_s" -lt 10 ] && bench_s=10
      timeout $((bench_s + 20)) "$bundle/bench-kernels" --out "$ours" --max-seconds "$bench_s" ||
        echo "bench-kernels: FAILED or timed out (rc $?)"
      step "torch benches"
      timeout $((bench_s + 20)) python3 "$bundle/bench_torch.py" --out "$theirs" --max-seconds "$bench_s" ||
        echo "bench_torch: FAILED or timed out (rc $?)"
      # ---- rollout throughput (issue 15): ours vs transformers generate on
      # ---- random weights at the 7B shapes (else 3B), batches 64 and 256
      # ---- of 1024-token prompts with a 448px image, 512 new tokens, and
      # ---- the recipe's mix; each case prints as it ends, so a timeout
      # ---- keeps what finished.
      rollout_cfg=""
      for size in 7b 3b; do
        f=configs/models/qwen2.5-vl-$size/config.json
        if [ -z "$rollout_cfg" ] && [ -f "$f" ]; then rollout_cfg=$f; fi
      done
      rollout_s=$(($(left) / 3))
      [ "$rollout_s" -gt 150 ] && rollout_s=150
      if [ -z "$rollout_cfg" ]; then
        step "rollout bench: no 7B/3B config.json under configs/models/, skipped"
      elif [ "$rollout_s" -lt 30 ]; then
        step "rollout bench: skipped (only $(left) s left)"
      else
        step "rollout bench: vppo-engine bench-rollout vs transformers generate ($rollout_cfg, ${rollout_s} s each at most)"
        timeout "$rollout_s" "$bundle/vppo-engine" bench-rollout --config "$rollout_cfg" --device cuda \
          --out "$results/bench-rollout.jsonl" || echo "bench-rollout: exited with $? (timeout: 124)"
        timeout "$rollout_s" python3 "$bundle/bench_rollout_torch.py" --config "$rollout_cfg" \
          --out "$results/bench-rollout-torch.jsonl" || echo "bench_rollout_torch: exited with $? (timeout: 124)"
        # What the CUDA graphs of decode steps are worth: batch 64 again,
        # every op launched eagerly.
        eager_s=$(($(left) / 4))
        [ "$eager_s" -gt 60 ] && eager_s=60
        if [ "$eager_s" -ge 20 ]; then
          timeout "$eager_s" "$bundle/vppo-engine" bench-rollout --config "$rollout_cfg" \
            --device cuda --batch 64 --mix-prompts 0 --enforce-eager \
            --out "$results/bench-rollout-eager.jsonl" || echo "bench-rollout --enforce-eager: exited with $? (timeout: 124)"
        else
          echo "bench-rollout --enforce-eager: skipped (only $(left) s left)"
        fi
        python3 - "$results/bench-rollout.jsonl" "$results/bench-rollout-torch.jsonl" "$results/bench-rollout-eager.jsonl" <<'PY' || true
import json, sys
def rows(path):
    try:
        return {r["id"]: r for r in map(json.loads, filter(str.strip, open(path)))}
    except OSError:
        return {}
ours, torch, eager = rows(sys.argv[1]), rows(sys.argv[2]), rows(sys.argv[3])
print("%-22s %12s %12s %10s %12s %14s %14s" % ("rollout case", "ours tok/s", "torch tok/s", "ours/torch",
      "% roofline", "graph replays", "eager tok/s"))
for k in sorted(set(ours) | set(torch), key=lambda k: (k.startswith("rollout mix"), len(k), k)):
    o, t, e = ours.get(k), torch.get(k), eager.get(k)
    print("%-22s %12s %12s %10s %12s %14s %14s" % (
        k,
        "%.0f" % o["tokens_per_s"] if o else "-",
        "%.0f" % t["tokens_per_s"] if t else "-",
        "%.2f" % (o["tokens_per_s"] / t["tokens_per_s"]) if o and t else "-",
        "%.1f" % o["pct_of_roofline"] if o else "-",
        "%d/%d" % (o["graph_replays"], o["steps"]) if o else "-",
        "%.0f" % e["tokens_per_s"] if e else "-"))
PY
      fi
      # Out-of-bounds / race check of the kernels on their small cases (the
      # large ones would take minutes under the sanitizer), in what time is left.
      # ("flash_attn" also selects the flash_attn_tc and flash_attn_wgmma cases.)
      memcheck_s=$(($(left) - 20))
      [ "$memcheck_s" -gt 120 ] && memcheck_s=120
      if ! command -v compute-sanitizer >/dev/null; then
        step "memcheck: compute-sanitizer not on PATH, skipped"
      elif [ "$memcheck_s" -lt 30 ]; then
        step "memcheck: skipped (only $(left) s left)"
      else
        step "compute-sanitizer memcheck of the small cases (${memcheck_s} s at most)"
        timeout "$memcheck_s" compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
          "$bundle/shaders" "flash_attn" "paged_decode lens=[1]" "paged_attn_tc lens=[1] " "rope Text1d fwd+bwd tokens=1 " \
          "n=1" "tokens=1000" "logprob chunked fwd+bwd rows=5" "adamw multi-tensor lens=[1]" \
          "sample rows=32 vocab=777" "sample rows=64 vocab=1000" "patch_embed 28x28" ||
          echo "compute-sanitizer: memcheck FAILED or timed out (rc $?)"
      fi
      step "summary of the correctness checks"
      grep -aE "^shaders: [0-9]+ passed|^(ok|FAIL) +qwen2.5-vl (device|graph bf16)|^FAIL|score --device cuda vs cpu|generate --device cuda vs cpu|train --device cuda vs cpu|^rollout (batch|mix)|(memcheck|racecheck|synccheck) FAILED|ERROR SUMMARY|RACECHECK SUMMARY" "$log" | awk '!seen[$0]++' || true
      step "table: ours vs torch (torch/ours > 1: ours faster; % roof: ours vs the card's peak)"
      # The attention step's timings (taken early, before any deadline) win.
      cat "$attn_ours" >>"$ours" 2>/dev/null || true
      cat "$attn_theirs" >>"$theirs" 2>/dev/null || true
      python3 "$bundle/bench_table.py" "$ours" "$theirs" | tee "$results/table.txt"
      echo "gpu-check: done in $((SECONDS - start)) s; results in $results"
    } 2>&1 | tee "$log"
    ;;
  *)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
