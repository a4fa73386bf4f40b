#!/usr/bin/env bash
# Checks the boundary of DESIGN.md: only the worker links libtorch. Reads the
# dynamic section of each binary in the given build folder.
set -euo pipefail
dir=${1:-target/debug}
fail=0

needs_torch() { readelf -d "$1" | grep -E 'NEEDED.*lib(torch|c10)' >/dev/null; }

for bin in jepa-coordinator jepactl; do
  if needs_torch "$dir/$bin"; then
    echo "link-check: $dir/$bin links libtorch; the coordinator must not" >&2
    fail=1
  fi
done
if ! needs_torch "$dir/jepa-worker"; then
  echo "link-check: $dir/jepa-worker does not link libtorch" >&2
  fail=1
fi
if ! readelf -d "$dir/jepa-worker" | grep -E '(RUNPATH|RPATH).*torch/lib' >/dev/null; then
  echo "link-check: $dir/jepa-worker has no rpath to libtorch" >&2
  fail=1
fi
# The worker must start from a plain environment, with no library path set.
if ! env -i "$dir/jepa-worker" info >/dev/null; then
  echo "link-check: $dir/jepa-worker does not start without LD_LIBRARY_PATH" >&2
  fail=1
fi
[ "$fail" -eq 0 ] && echo "link-check: libtorch only in jepa-worker, which starts without LD_LIBRARY_PATH"
exit "$fail"
