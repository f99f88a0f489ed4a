# Sourced by scripts/install-peers.sh and scripts/cluster.sh (which define `log`).
#
# apt_install_pinned NAME=VERSION...: installs, at exactly those versions, the Debian packages
# that are not installed at them. Returns 0 when it installed something, 1 when all were there.
apt_install_pinned() {
  local need=() p
  for p in "$@"; do
    if ! dpkg-query -W -f='${Status} ${Version}' "${p%%=*}" 2>/dev/null | grep "install ok installed ${p#*=}" >/dev/null; then
      need+=("$p")
    fi
  done
  [ ${#need[@]} -gt 0 ] || return 1
  log "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}
