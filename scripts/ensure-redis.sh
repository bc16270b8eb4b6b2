#!/usr/bin/env bash
# The session-store and two-replica tests start Debian's redis-server themselves; install it when missing
# (needs root and apt). Nothing is left running: the tests start and stop their own servers.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  echo "redis-server is missing: install Debian's 'redis-server' package (sudo apt-get install redis-server)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends redis-server >/dev/null
# the package may start a system service; the tests want none running
(service redis-server stop || true) >/dev/null 2>&1
