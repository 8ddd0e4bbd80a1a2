#!/usr/bin/env bash
# make gpu-bundle: downloads the wheels of experiments/gpu/bundle.txt (Python 3.12, manylinux
# x86-64, --no-deps) into experiments/gpu/wheels, then lists them with their sizes.
# Needs the package registry; run it here, not on the (offline) GPU machine.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DEST=${GPU_BUNDLE_DIR:-$HERE/wheels}
PYTHON=${PYTHON:-python3}
LIMIT_MIB=32  # the device tool carries 64 MiB in all, the working tree included

mapfile -t PINS < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$HERE/bundle.txt" | grep -v '^$')
rm -rf "$DEST"
mkdir -p "$DEST"
"$PYTHON" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$DEST" "${PINS[@]}"

n=$(find "$DEST" -name '*.whl' | wc -l)
if [[ $n -ne ${#PINS[@]} ]]; then
    echo "gpu-bundle: ${#PINS[@]} pins in bundle.txt but $n wheels in $DEST" >&2
    exit 1
fi
echo "gpu-bundle: $n wheels in $DEST (carry [\"${DEST#"$(cd "$HERE/../.." && pwd)/"}\"] in a device run)"
total=0
for w in "$DEST"/*.whl; do
    size=$(stat -c %s "$w")
    total=$((total + size))
    printf '  %8.1f KiB  %s\n' "$(echo "$size / 1024" | bc -l)" "$(basename "$w")"
done
printf '  %8.1f KiB  in all\n' "$(echo "$total / 1024" | bc -l)"
if ((total > LIMIT_MIB * 1024 * 1024)); then
    echo "gpu-bundle: over ${LIMIT_MIB} MiB: too large to travel beside the working tree" >&2
    exit 1
fi
