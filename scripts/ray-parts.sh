#!/usr/bin/env bash
# Ray's wheel for the GPU host, in two parts that each fit the device tool's carry limit beside the repository:
# the cp312 manylinux wheel less what a local cluster of Python tasks never loads (Java jars, the dashboard's web
# build, RLlib, ray.llm: 79 MB -> 42 MB), split into .raypart-a/ and .raypart-b/ (ignored by git).
# Usage, from the repository root: bash scripts/ray-parts.sh [VERSION]   (default: the version pinned below)
# Then, on the warm machine, back to back: carry .whl and start the run; carry .raypart-a and
# `cp .raypart-a/* /tmp/`; carry .raypart-b and
#   cat /tmp/ray.part.aa .raypart-b/ray.part.ab > /tmp/ray-$V-cp312-cp312-manylinux2014_x86_64.whl
#   python3 -m pip install -q --no-index --no-deps --target /tmp/raysite /tmp/ray-*.whl
#   cp -r /tmp/raysite/ray /tmp/raysite/ray-*.dist-info /tmp/site/
# (Ray's own requirements are on the host or in .whl/: click, filelock, msgpack, packaging, protobuf, pyyaml,
# requests, jsonschema.)
set -euo pipefail
version=${1:-2.60.0}
work=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d "$work" "ray==$version"
wheel=$(ls "$work"/ray-*.whl)
zip -q -d "$wheel" 'ray/jars/*' 'ray/dashboard/client/build/*' 'ray/rllib/*' 'ray/llm/*' >/dev/null
rm -rf .raypart-a .raypart-b && mkdir -p .raypart-a .raypart-b
split -b 21M "$wheel" .raypart-a/ray.part.
mv .raypart-a/ray.part.ab .raypart-b/
[ ! -e .raypart-a/ray.part.ac ] || { echo "the wheel needs more than two parts" >&2; exit 1; }
for d in .raypart-a .raypart-b; do grep -qxF "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude; done
ls -la .raypart-a .raypart-b && rm -rf "$work"
