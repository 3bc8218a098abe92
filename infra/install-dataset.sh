#!/usr/bin/env bash
# Fashion-MNIST from Debian's dataset-fashion-mnist package, where apt exists. Elsewhere, put the four
# idx .gz files in a folder and point data.root in params.yaml at it.
set -euo pipefail
root=/usr/share/datasets/fashion-mnist
[ -f "$root/train-images-idx3-ubyte.gz" ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "Fashion-MNIST not found at $root and apt-get is unavailable: set data.root to a folder with the idx .gz files" >&2
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
  || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null; }
echo "installed Debian package dataset-fashion-mnist"
