#!/usr/bin/env bash
# Installs what keybroker's tests need on a fresh Debian 12 machine, at pinned versions.
# Idempotent: already-installed pieces are skipped. Needs root (apt-get, mounts).
set -euo pipefail

FUSE3_VERSION="3.14.0-4"

log() { printf '[install-peers] %s\n' "$*"; }

need_apt=()
if ! dpkg-query -W -f='${Status} ${Version}' fuse3 2>/dev/null | grep -q "install ok installed ${FUSE3_VERSION}"; then
  need_apt+=("fuse3=${FUSE3_VERSION}")
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if [ ! -e /dev/fuse ]; then
  log "/dev/fuse is missing: this machine cannot run FUSE tests"; exit 1
fi
log "fuse3 $(dpkg-query -W -f='${Version}' fuse3) ready"
