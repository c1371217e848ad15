#!/usr/bin/env bash
# Split the vLLM bundle's parts (../shared/device/build-vllm-bundle.sh writes .device-bundle/part0..3.d,
# ~50 MiB each) into pieces small enough to travel beside this repository's working tree: a device call
# carries at most 64 MiB in all, and the tree holds the reference model's weights (~31 MB).
#
#   bash experiments/device_bundle_split.sh [PIECE_MIB]     # default 25
#
# Writes .device-bundle/pieces/<part>.<nn>.d/<part>.<nn> (git-ignored with .device-bundle/) and prints
# one `device_session.sh piece NAME` call per piece; `device_session.sh install` joins them on the device.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-25}
rm -rf .device-bundle/pieces
mkdir -p .device-bundle/pieces
for part in .device-bundle/part?.d/part?; do
  name=$(basename "$part")
  split -b "${size}M" -d -a 2 "$part" ".device-bundle/pieces/$name."
done
for piece in .device-bundle/pieces/part?.??; do
  name=$(basename "$piece")
  mkdir -p ".device-bundle/pieces/$name.d"
  mv "$piece" ".device-bundle/pieces/$name.d/$name"
  echo "bash experiments/device_session.sh piece $name    # carry .device-bundle/pieces/$name.d"
done
