#!/usr/bin/env bash
# Build the Kafka-compatible `tansu` broker once per machine and cache it.
# Prints the binary's path. The first build takes ~11 minutes on 2 cores.
set -euo pipefail
version=0.6.0
cache="${SLUICEGATE_CACHE:-$HOME/.cache/sluicegate}/tansu-$version"
bin="$cache/bin/tansu"
if [ ! -x "$bin" ]; then
  echo "building tansu $version into $cache (first run on this machine: ~11 min)" >&2
  # Its own target dir, so it neither fights with nor pollutes the project's build.
  CARGO_TARGET_DIR="$cache/target" cargo install tansu --version "$version" --locked \
    --features dynostore,libsql --root "$cache" >&2
  rm -rf "$cache/target"
fi
echo "$bin"
