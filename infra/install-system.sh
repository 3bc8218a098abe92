#!/usr/bin/env bash
# Debian's headless Chromium: the report test opens reports/*/index.html in it and takes a screenshot.
# Optional for running the pipeline; without apt-get, install a Chromium and put it on PATH.
set -euo pipefail
command -v chromium >/dev/null && exit 0
if ! command -v apt-get >/dev/null; then
  echo "chromium not found and apt-get is unavailable: the report screenshot test needs a chromium on PATH" >&2
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get install -y -q chromium >/dev/null 2>&1 \
  || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q chromium >/dev/null; }
echo "installed Debian package chromium"
