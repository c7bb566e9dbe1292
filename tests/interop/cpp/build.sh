#!/usr/bin/env bash
# Builds the OpenIGTLink reference example programs the interop tests run (see CMakeLists.txt).
#   tests/interop/cpp/build.sh [OUT_DIR]      (default: build/igtl-examples)
# Needs Debian's libopenigtlink-dev, openigtlink-examples, cmake and g++. Puts the programs and the
# Imager test images in OUT_DIR; the tests find them through REGSEG_IGTL_EXAMPLES=OUT_DIR.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../../../build/igtl-examples}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
src="${IGTL_EXAMPLES_SRC:-/usr/share/doc/openigtlink-examples/examples}"
if [ ! -d "$src" ]; then
  echo "build.sh: $src not found: install openigtlink-examples (apt-get install openigtlink-examples)" >&2
  exit 1
fi
# Debian may compress larger files under /usr/share/doc: work on an uncompressed copy.
rm -rf "$out/src"
cp -r "$src" "$out/src"
find "$out/src" -name '*.gz' -exec gunzip -f {} +
start=$SECONDS
cmake -S "$here" -B "$out/cmake" -DCMAKE_BUILD_TYPE=Release -DIGTL_EXAMPLES_DIR="$out/src" >"$out/cmake.log"
cmake --build "$out/cmake" -j "$(nproc 2>/dev/null || echo 2)" >>"$out/cmake.log"
for program in ImagerServer ReceiveClient ReceiveServer PolyDataClient; do
  cp "$out/cmake/$program" "$out/$program"
done
rm -rf "$out/img"
cp -r "$out/src/Imager/img" "$out/img"
echo "build.sh: OpenIGTLink examples built in $out ($((SECONDS - start)) s)"
