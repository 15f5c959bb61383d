#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need
# (a Python venv with the ziglang C toolchain for the C-built wasm module,
# the Lambda runtime client, paho-mqtt, boto3, the AWS CLI and the AWS IoT
# Device SDK; the npm Lambda runtime client and AWS SDK for JavaScript;
# openssl for the TLS test), then formatting, lints and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/roost-target}"
VENV="${ROOST_VENV:-$HOME/.cache/roost-venv}"

step() { printf '\n==> %s\n' "$*"; }

missing=()
command -v openssl >/dev/null || missing+=(openssl)
command -v curl >/dev/null || missing+=(curl)
command -v mosquitto_pub >/dev/null || missing+=(mosquitto-clients)
# The npm Lambda runtime client builds a native addon with these.
command -v cmake >/dev/null || missing+=(cmake)
command -v autoconf >/dev/null || missing+=(autoconf)
command -v automake >/dev/null || missing+=(automake)
command -v libtoolize >/dev/null || missing+=(libtool)
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]} (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  step "creating the Python venv at $VENV"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import ziglang, awslambdaric, paho.mqtt, boto3, awscli, awsiot' 2>/dev/null; then
  step "installing test tools into the venv (ziglang, awslambdaric, paho-mqtt, boto3, awscli, awsiotsdk)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r scripts/requirements-test.txt
fi
export PYTHON="$VENV/bin/python"

# The Node.js Lambda runtime client (aws-lambda-ric 3.x: 4.x needs Node 22).
NODE_DIR="${ROOST_NODE_DIR:-$HOME/.cache/roost-node}"
if [ ! -f "$NODE_DIR/node_modules/aws-lambda-ric/bin/index.mjs" ]; then
  step "installing the Node.js Lambda runtime client into $NODE_DIR (npm; builds a native addon)"
  mkdir -p "$NODE_DIR"
  # node-gyp would download Node's headers, and this network has no route
  # to them: Debian's nodejs ships them under /usr/include/node.
  (cd "$NODE_DIR" && npm init -y >/dev/null && npm_config_nodedir="${npm_config_nodedir:-/usr}" npm install --no-audit --no-fund aws-lambda-ric@3.3.0 >/dev/null)
fi
# The AWS SDK for JavaScript v3, a second SDK family against the local APIs.
if [ ! -d "$NODE_DIR/node_modules/@aws-sdk/client-secrets-manager" ]; then
  step "installing the AWS SDK for JavaScript into $NODE_DIR (npm)"
  (cd "$NODE_DIR" && npm install --no-audit --no-fund @aws-sdk/client-iot-data-plane@3.1138.0 @aws-sdk/client-lambda@3.1164.0 @aws-sdk/client-secrets-manager@3.1164.0 >/dev/null)
fi
export ROOST_NODE_RIC="$NODE_DIR/node_modules/aws-lambda-ric/bin/index.mjs"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings

step "cargo test"
cargo test --workspace --quiet --no-fail-fast "$@"

# The task identity tests switch users, so they need root and are marked
# ignored (a run without root shows them as not run). CI runs as root.
if [ "$(id -u)" = 0 ]; then
  step "cargo test: the task identity tests (as root)"
  cargo test -p roost --test identity --quiet -- --ignored
else
  step "not root: the task identity tests did not run (crates/roost/tests/identity.rs)"
fi
