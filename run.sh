#!/usr/bin/env bash
# amesh on a fresh Debian 12:  bash run.sh demo   |   bash run.sh test
# Installs what is missing (Debian packages, a venv with amesh), then runs the demo or the tests.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${AMESH_VENV:-/opt/amesh/venv}   # readable by nginx's `nobody` workers, unlike ~root
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
APT_PACKAGES=(nginx libnginx-mod-http-lua libnginx-mod-http-ndk lua-resty-core lua-resty-lrucache lua-cjson
  luajit2 python3 python3-venv python3-dev libpython3-dev cmake ninja-build gcc procps
  openssl ca-certificates git)

setup() {
  if ! dpkg -s "${APT_PACKAGES[@]}" >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    $SUDO mkdir -p "$(dirname "$VENV")"
    $SUDO /usr/bin/python3 -m venv "$VENV"
  fi
  $SUDO "$VENV/bin/pip" install -q --upgrade pip
  $SUDO "$VENV/bin/pip" install -q "$1"
}

case "${1:-}" in
  demo)
    setup .
    exec "$VENV/bin/amesh" demo
    ;;
  test)
    setup ".[test]"
    shift
    exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
    ;;
  *)
    echo "usage: bash run.sh demo | test [pytest args]" >&2
    exit 2
    ;;
esac
