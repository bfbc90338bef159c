#!/usr/bin/env bash
# Build the Kafka-compatible `tansu` broker once per machine and cache it.
# Prints the binary's path. The first build takes ~11 minutes on 2 cores.
set -euo pipefail
version=0.6.0
cache="${SLUICEGATE_CACHE:-$HOME/.cache/sluicegate}/tansu-$version"
bin="$cache/bin/tansu"
mkdir -p "$cache"
# One build at a time: .ci/run starts one in the background while it lints, and the test
# script's call waits for it here instead of starting a second.
exec 9>"$cache.lock"
flock 9
if [ ! -x "$bin" ]; then
  echo "building tansu $version into $cache (first run on this machine: ~11 min)" >&2
  # Its own target dir, so it neither fights with nor pollutes the project's build.
  CARGO_TARGET_DIR="$cache/target" cargo install tansu --version "$version" --locked \
    --features dynostore,libsql --root "$cache" >&2
  rm -rf "$cache/target"
fi
echo "$bin"
