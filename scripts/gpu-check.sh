#!/usr/bin/env bash
# The one prepared GPU check (shared/docs/gpu.md): build here, carry the
# binaries, run there, print one table.
#
#   scripts/gpu-check.sh build   # here (no GPU): release binaries -> gpu-bundle/
#   scripts/gpu-check.sh run     # on the GPU machine: device info + kernel tests
#
# With the device tool: run `scripts/gpu-check.sh build` locally, then
# `bash scripts/gpu-check.sh run` there with carry ["gpu-bundle"].
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bundle=gpu-bundle

case "${1:-}" in
  build)
    export VPPO_REQUIRE_KERNELS=1
    bash scripts/install-cuda-toolchain.sh >/dev/null
    mkdir -p "$bundle"
    cargo build --release --bin vppo-engine
    cp "${CARGO_TARGET_DIR:-target}/release/vppo-engine" "$bundle/"
    shaders_bin=$(cargo test --release --test shaders --no-run --message-format=json 2>/dev/null |
      python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "shaders":
        print(m["executable"])')
    cp "$shaders_bin" "$bundle/shaders"
    strip "$bundle"/* || true
    du -sh "$bundle"
    ;;
  run)
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv || true
    "$bundle/vppo-engine" info
    "$bundle/shaders"
    # Out-of-bounds / race check of the kernels on their small cases (the
    # large ones would take minutes under the sanitizer).
    if command -v compute-sanitizer >/dev/null; then
      timeout 240 compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
        "$bundle/shaders" "flash_attn" "paged_decode lens=[1]" "rope Text1d fwd+bwd tokens=1 " \
        "n=1" "tokens=1000" "logprob chunked fwd+bwd rows=5" "adamw multi-tensor lens=[1]" \
        "sample rows=32 vocab=777" "sample rows=64 vocab=1000" "patch_embed 28x28" ||
        echo "compute-sanitizer: memcheck FAILED or timed out (rc $?)"
    fi

    # ---- device model forward (branch gpu-model): GEMMs, device forward,
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
    "$bundle/shaders" "gemm " "device forward" || echo "shaders gemm + device forward: FAILED"
    fx=tests/fixtures/qwen2_5_vl/single_noresize
    response=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["response"])' "$fx/inputs.json")
    prompt="<image>What is shown in the image? Describe the picture."
    score_dir=$(mktemp -d)
    for dev in cpu cuda; do
      "$bundle/vppo-engine" score --model "$fx" --image "$fx/img0.png" --prompt "$prompt" \
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
    for dev in cpu cuda; do
      "$bundle/vppo-engine" generate --model "$gfx" --image "$gfx/img0.png" \
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
    ;;
  *)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
