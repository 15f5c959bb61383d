#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need
# (a Python venv with the ziglang C toolchain for the C-built wasm module,
# openssl for the TLS test), then formatting, lints and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/roost-target}"
VENV="${ROOST_VENV:-$HOME/.cache/roost-venv}"

step() { printf '\n==> %s\n' "$*"; }

missing=()
command -v openssl >/dev/null || missing+=(openssl)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]} (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  step "creating the Python venv at $VENV"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import ziglang, awslambdaric' 2>/dev/null; then
  step "installing test tools into the venv (ziglang, awslambdaric)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r scripts/requirements-test.txt
fi
export PYTHON="$VENV/bin/python"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings

step "cargo test"
cargo test --workspace --quiet "$@"
