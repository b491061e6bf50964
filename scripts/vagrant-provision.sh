#!/usr/bin/env bash
# Provision one VM of the Vagrantfile (run as root by `vagrant up`), with the repository's own
# scripts: scripts/bootstrap.sh, scripts/install-overlayd.sh (the systemd steps of
# docs/daemon.md) and `overlayctl config set`. The first VM (--etcd) also runs Debian's etcd
# (installed by bootstrap.sh) as a service on its private address and writes the network
# config; every VM then runs one overlayd under systemd, bound to its private address.
#
#   vagrant-provision.sh PRIVATE_IP ETCD_ENDPOINT --etcd|--no-etcd [CONFIG_JSON]
#
# Environment: OVERLAY_REPO (default /vagrant, the synced folder), OVERLAY_VENV (default
# $OVERLAY_REPO/.venv), OVERLAY_SKIP_BOOTSTRAP=1 (the packages and venv are there already: the
# lab's container image, where tests/test_lab_containers.py runs this script).
set -euo pipefail
ip=${1:?usage: vagrant-provision.sh PRIVATE_IP ETCD_ENDPOINT --etcd|--no-etcd [CONFIG_JSON]}
etcd=${2:?ETCD_ENDPOINT missing, e.g. http://192.168.56.11:2379}
role=${3:?--etcd or --no-etcd missing}
config=${4:-'{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}'}
repo=${OVERLAY_REPO:-/vagrant}
venv=${OVERLAY_VENV:-$repo/.venv}
if [[ ! $ip =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]]; then
  echo "vagrant-provision.sh: '$ip' is not an IPv4 address" >&2
  exit 2
fi
if [[ ! $etcd =~ ^https?://[A-Za-z0-9.:-]+$ ]]; then
  echo "vagrant-provision.sh: '$etcd' is not an etcd endpoint URL" >&2
  exit 2
fi
cd "$repo"
if [[ -z ${OVERLAY_SKIP_BOOTSTRAP:-} ]]; then
  ./scripts/bootstrap.sh
fi
case $role in
  --etcd)
    cat >/etc/default/etcd <<CONF
ETCD_NAME=$(hostname)
ETCD_DATA_DIR=/var/lib/etcd/default
ETCD_LISTEN_CLIENT_URLS=http://$ip:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=http://$ip:2379
CONF
    # bootstrap.sh stops Debian's etcd service (the tests start their own); here it is wanted.
    systemctl unmask etcd >/dev/null 2>&1 || true
    systemctl enable etcd
    systemctl restart etcd
    FLANNELD_ETCD_ENDPOINTS=$etcd "$venv/bin/overlayctl" config set "$config"
    ;;
  --no-etcd) ;;
  *)
    echo "vagrant-provision.sh: third argument must be --etcd or --no-etcd, not '$role'" >&2
    exit 2
    ;;
esac
./scripts/install-overlayd.sh --venv "$venv" \
  --set "FLANNELD_ETCD_ENDPOINTS=$etcd" \
  --set "FLANNELD_IFACE=$ip"
