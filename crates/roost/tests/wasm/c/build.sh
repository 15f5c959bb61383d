#!/usr/bin/env bash
# Builds upper.c into a WASI preview1 command module with the clang that the
# `ziglang` PyPI package ships (pip install ziglang).
# Usage: build.sh [OUT]   (OUT defaults to upper.wasm next to this script)
# Env:   PYTHON  interpreter that has ziglang installed (default python3)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python3}"
out="${1:-$here/upper.wasm}"

if ! "$py" -c 'import ziglang' 2>/dev/null; then
    echo "build.sh: the 'ziglang' Python package is not installed for $py" >&2
    echo "build.sh: install it with: $py -m pip install ziglang  (or set PYTHON=...)" >&2
    exit 1
fi

# -s strips debug info (~950 KB -> ~25 KB). The first build on a machine also
# compiles wasi-libc into zig's cache, which takes ~20-30 s.
"$py" -m ziglang cc --target=wasm32-wasi -O2 -s -o "$out" "$here/upper.c"
echo "built $out"
