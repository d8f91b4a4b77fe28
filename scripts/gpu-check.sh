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
    ;;
  *)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
