#!/usr/bin/env bash
# Runs every test, Kafka ones included, on a machine with only the Rust toolchain:
# installs HAProxy and OpenSSL (the TLS test) if missing, builds the `tansu` broker once and
# caches it, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} (Debian packages)" >&2
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

SLUICEGATE_TANSU_BIN="$(tests/install-tansu.sh)"
export SLUICEGATE_TANSU_BIN
# The Kafka tests must run, not skip, when this script runs them.
export SLUICEGATE_REQUIRE_KAFKA_TESTS=1

cargo test --locked --all-targets "$@"
