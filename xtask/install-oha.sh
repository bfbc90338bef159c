#!/usr/bin/env bash
# Build the `oha` HTTP load generator once per machine and cache it (like tests/install-tansu.sh
# does for tansu). Prints the binary's path. A few minutes on 2 cores the first time.
set -euo pipefail
version="${OHA_VERSION:-1.16.0}"
cache="${SLUICEGATE_CACHE:-$HOME/.cache/sluicegate}/oha-$version"
bin="$cache/bin/oha"
if [ ! -x "$bin" ]; then
  echo "building oha $version into $cache (first run on this machine: a few minutes)" >&2
  # Its own target dir, so it neither fights with nor pollutes the project's build.
  CARGO_TARGET_DIR="$cache/target" cargo install oha --version "$version" --locked \
    --root "$cache" >&2
  rm -rf "$cache/target"
fi
echo "$bin"
