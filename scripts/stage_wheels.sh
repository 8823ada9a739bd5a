#!/usr/bin/env bash
# The Python packages a device run needs and the device lacks (Hydra, OmegaConf and
# Albumentations with their dependencies), at the versions this venv runs, as Python 3.12
# manylinux wheels under .device-data/wheels (git-ignored, about 9 MiB): carry that folder
# in the device call that runs scripts/gpu_bench.sh, which installs them there.
#
#   bash scripts/stage_wheels.sh        # from the project root, after `make setup`
set -euo pipefail
top=$(git rev-parse --show-toplevel)
out="$top/.device-data/wheels"
grep -qxF '/.device-data/' "$top/.git/info/exclude" 2>/dev/null \
    || echo '/.device-data/' >> "$top/.git/info/exclude"
pip="$top/.venv/bin/pip"
wanted='hydra-core|omegaconf|antlr4-python3-runtime|albumentations|albucore|pydantic|pydantic-core|typing-inspection|annotated-types|stringzilla|simsimd|pyyaml'
# pip freeze spells some names with "_": compare lower-cased, with "-".
pins=$("$pip" freeze | tr 'A-Z_' 'a-z-' | grep -E "^($wanted)==")
rm -rf "$out"
mkdir -p "$out"
# antlr4's runtime is published as a source archive only; its wheel (pure Python) is built here.
"$pip" wheel -q --no-deps -w "$out" $(grep '^antlr4' <<<"$pins")
"$pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -d "$out" $(grep -v '^antlr4' <<<"$pins")
ls "$out"
du -sh "$out"
