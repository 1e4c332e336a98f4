#!/usr/bin/env bash
# GPU benchmark: for each model shape in tools/specs, write a synthetic GGUF
# (same shapes and dtypes as the real model, random valid weights: speed does
# not depend on the values) and run `kiln bench` in two feature sets. The
# read roof is measured in the same run, by the same binary.
#
#   tools/bench-gpu.sh [path/to/kiln]      (default: target/release/kiln)
set -euo pipefail
BIN=${1:-target/release/kiln}
DIR=${KILN_BENCH_DIR:-/tmp/kiln-bench}
mkdir -p "$DIR"
for spec in tools/specs/*.json; do
  name=$(basename "$spec" .json)
  "$BIN" synth --spec "$spec" --out "$DIR/$name.gguf" --seed 7
  for features in all none; do
    echo "== $name, --features $features"
    "$BIN" bench --model "$DIR/$name.gguf" --features "$features" --decode 64 --prefill 512
  done
done
