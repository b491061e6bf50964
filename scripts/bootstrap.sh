#!/usr/bin/env bash
# Install everything overlay needs on a Debian 12 machine, as root, and make the venv .venv.
# Idempotent: a second run only checks. Used by the README's quick start and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  etcd-server etcd-client          # the real etcd the daemon, tests and lab use
  mosquitto mosquitto-clients      # the real MQTT broker for events
  containernetworking-plugins      # reference CNI plugins: bridge, host-local, portmap, loopback
  iproute2 iptables nftables ethtool procps util-linux   # ip, bridge, sysctl, chrt, unshare, nsenter
  iperf3 tcpdump socat             # traffic, capture, baselines
  podman busybox-static            # a real container runtime for the CNI end-to-end test
  python3 python3-venv python3-pip
  gcc libc6-dev                    # benchmark baselines written in C
  openssl                          # test certificates for etcd TLS
  prometheus                       # promtool check metrics on a live /metrics page (tests)
  docker.io                        # the lab's container provider (dockerd; started by `lab up`)
  debootstrap                      # the container lab's base image, built locally
  ruby shellcheck                  # checks of the Vagrantfile and the provisioning script
  systemd jq                       # systemd-analyze verify of overlayd.service; docs/cni.md's jq line
)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  [[ $p == \#* ]] && continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # No package may start its service while it installs: docker.io's dockerd would install its
  # iptables rules (FORWARD policy DROP) on this host; `lab up` starts dockerd itself without
  # them. A policy-rc.d that exit 101s is the Debian way; one already present is kept.
  policy=/usr/sbin/policy-rc.d
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's etcd, mosquitto and prometheus packages start services: overlay starts its own
# etcd and broker, and only needs promtool from prometheus.
for svc in etcd mosquitto prometheus; do
  if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl disable --now "$svc" >/dev/null 2>&1 || true
  fi
done

# /usr/bin/python3 on purpose: a real interpreter, never a pyenv shim (the CNI plugin and the
# daemons exec it often).
if [[ ! -x .venv/bin/python ]]; then
  echo "bootstrap: creating .venv"
  /usr/bin/python3 -m venv .venv
fi
stamp=.venv/.overlay-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  echo "bootstrap: installing overlay and its test extras into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
echo "bootstrap: ready (.venv/bin/overlayctl, .venv/bin/overlayd)"
