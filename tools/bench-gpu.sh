#!/usr/bin/env bash
# GPU benchmark: for each model shape in tools/specs, write a synthetic GGUF
# (same shapes and dtypes as the real model, random valid weights: speed does
# not depend on the values) and run `kiln bench`. The read roof is measured
# in the same run, by the same binary.
#
# 1. The two small real models, as they are, in two feature sets.
# 2. The 8B-class shapes (Llama-3-8B, Qwen2.5-7B) in the dtype mixes q4_k_m
#    (llama.cpp's Q4_K_M rules, from the spec) and q4_0, all features. Each
#    GGUF is ~5 GB: written one at a time and deleted after its run. The
#    Llama-3-8B shape once more with --f32-activations (matmul inputs kept
#    in f32 instead of int8), for the comparison.
#
#   tools/bench-gpu.sh [path/to/kiln]      (default: target/release/kiln)
set -euo pipefail
BIN=${1:-target/release/kiln}
DIR=${KILN_BENCH_DIR:-/tmp/kiln-bench}
mkdir -p "$DIR"
for name in smollm2-135m-q4_1 gemma3-270m-q4_k_m; do
  "$BIN" synth --spec "tools/specs/$name.json" --out "$DIR/$name.gguf" --seed 7
  for features in all none; do
    echo "== $name, --features $features"
    "$BIN" bench --model "$DIR/$name.gguf" --features "$features" --decode 64 --prefill 512
  done
done
for name in llama3-8b qwen2.5-7b; do
  for mix in q4_k_m q4_0; do
    model="$DIR/$name-$mix.gguf"
    trap 'rm -f "$model"' EXIT
    "$BIN" synth --spec "tools/specs/$name.json" --mix "$mix" --out "$model" --seed 7
    echo "== $name, --mix $mix, --features all"
    "$BIN" bench --model "$model" --features all --decode 32 --prefill 512
    if [ "$name" = llama3-8b ]; then
      echo "== $name, --mix $mix, --features all --f32-activations"
      "$BIN" bench --model "$model" --features all --decode 32 --prefill 16 --f32-activations
    fi
    rm -f "$model"
  done
done
