#!/usr/bin/env bash
# Proof without a GPU that the tensor-core attention kernels run on tensor
# cores and do not spill (issue 14). Builds (debug, as CI does), then:
#  - reads the SASS of every embedded fatbin with `cuobjdump -sass` and FAILS
#    when a tensor-core kernel (flash_attn_tc_fwd_*, flash_attn_tc_bwd_*,
#    paged_attn_tc_split_*) has no HMMA instruction for sm_80 or sm_90, or a
#    kernel of an sm_90a file (wgmma) has no HGMMA for sm_90a, or when fewer
#    than the 3 flash_attn_wgmma_fwd_* or the 3 flash_attn_wgmma_bwd_* kernels
#    are there for sm_90a;
#  - FAILS when ptxas reports spill stores or loads for any of them.
# Needs nvcc with cuobjdump + nvdisasm beside it (scripts/install-cuda-toolchain.sh
# installs the pinned 13.2.51 wheels) or $CUOBJDUMP.
# Usage: scripts/check-tensor-cores.sh   (NVCC as for the build)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

nvcc="${NVCC:-$(bash scripts/install-cuda-toolchain.sh --if-missing | tail -n 1)}"
cuobjdump="${CUOBJDUMP:-$(dirname "$nvcc")/cuobjdump}"
if [ ! -x "$cuobjdump" ]; then
  echo "check-tensor-cores: FAIL: no cuobjdump at $cuobjdump (run scripts/install-cuda-toolchain.sh or set CUOBJDUMP)" >&2
  exit 1
fi
export PATH="$(dirname "$cuobjdump"):$PATH"  # cuobjdump calls nvdisasm

# The build's OUT_DIR, from cargo itself (several stale build dirs may exist).
out_dir="$(NVCC="$nvcc" VPPO_REQUIRE_KERNELS=1 cargo build --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "build-script-executed" and m.get("package_id", "").find("vppo-engine") >= 0:
        out = m["out_dir"]
print(out)
')"
kernels="$out_dir/kernels"
[ -d "$kernels" ] || { echo "check-tensor-cores: FAIL: no kernels in $kernels" >&2; exit 1; }

tc_pattern='^(flash_attn_tc_fwd_|flash_attn_tc_bwd_|paged_attn_tc_split_)'
# The spill check also covers the sm_90a kernels (HGMMA, no HMMA).
spill_pattern='^(flash_attn_tc_fwd_|flash_attn_tc_bwd_|paged_attn_tc_split_|flash_attn_wgmma_fwd_|flash_attn_wgmma_bwd_)'
fail=0
checked=0
hgmma_checked=0
hgmma_bwd_checked=0
for fatbin in "$kernels"/*.fatbin; do
  # arch function hmma hgmma, one line per kernel and arch.
  counts="$("$cuobjdump" -sass "$fatbin" | awk '
    /code for / { if (fn != "") print arch, fn, h, g; fn = ""; arch = $3 }
    /Function : / { if (fn != "") print arch, fn, h, g; fn = $3; h = 0; g = 0 }
    / HMMA/ { h++ }
    / HGMMA/ { g++ }
    END { if (fn != "") print arch, fn, h, g }')"
  while read -r arch fn hmma hgmma; do
    [ -n "${fn:-}" ] || continue
    if [[ "$fn" =~ $tc_pattern ]] && { [ "$arch" = sm_80 ] || [ "$arch" = sm_90 ]; }; then
      checked=$((checked + 1))
      if [ "$hmma" -eq 0 ]; then
        echo "FAIL  $fn ($arch): no HMMA in the SASS" >&2
        fail=1
      else
        echo "ok    $fn ($arch): $hmma HMMA"
      fi
    fi
    if [ "$arch" = sm_90a ] && [[ "$fn" =~ (wgmma|_sm90a) ]]; then
      if [ "$hgmma" -eq 0 ]; then
        echo "FAIL  $fn ($arch): no HGMMA in the SASS" >&2
        fail=1
      else
        echo "ok    $fn ($arch): $hgmma HGMMA"
        [[ "$fn" =~ ^flash_attn_wgmma_fwd_ ]] && hgmma_checked=$((hgmma_checked + 1))
        [[ "$fn" =~ ^flash_attn_wgmma_bwd_ ]] && hgmma_bwd_checked=$((hgmma_bwd_checked + 1))
      fi
    fi
  done <<<"$counts"
done
if [ "$checked" -lt 8 ]; then
  echo "check-tensor-cores: FAIL: only $checked tensor-core kernels found in $kernels" >&2
  fail=1
fi
if [ "$hgmma_checked" -lt 3 ]; then
  echo "check-tensor-cores: FAIL: only $hgmma_checked flash_attn_wgmma_fwd_* kernels with HGMMA for sm_90a" >&2
  fail=1
fi
if [ "$hgmma_bwd_checked" -lt 3 ]; then
  echo "check-tensor-cores: FAIL: only $hgmma_bwd_checked flash_attn_wgmma_bwd_* kernels with HGMMA for sm_90a" >&2
  fail=1
fi

# Spills, from the ptxas report the binary embeds.
info="$(NVCC="$nvcc" VPPO_REQUIRE_KERNELS=1 cargo run --quiet -- info)"
spills="$(echo "$info" | awk -v pat="$spill_pattern" '$1 ~ pat && $6 != "0/0" { print }')"
if [ -n "$spills" ]; then
  echo "FAIL  tensor-core kernels spill registers (spill st/ld):" >&2
  echo "$spills" >&2
  fail=1
fi
spill_checked="$(echo "$info" | awk -v pat="$spill_pattern" '$1 ~ pat' | wc -l)"
echo "check-tensor-cores: $checked kernel/arch pairs with HMMA and $hgmma_checked + $hgmma_bwd_checked (fwd + bwd) with HGMMA checked, $spill_checked ptxas entries checked for spills"
if [ "$fail" -ne 0 ]; then
  exit 1
fi
echo "check-tensor-cores: ok"
