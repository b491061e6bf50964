#!/usr/bin/env bash
# Quick start: install what is needed, then run a 3-host overlay lab in network namespaces on
# this machine (local etcd, one overlayd per host, one container per host), probe every
# container from every other one (TCP and UDP) and leave the lab running.
# Exits non-zero when the connectivity matrix has a failure. Extra arguments go to `lab up`,
# e.g. ./scripts/lab.sh --backend udp --containers-per-node 2
# Environment: LAB_NAME (default: lab), LAB_NODES (default: 3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -ne 0 ]]; then
  echo "lab.sh: run as root (network namespaces, veth and vxlan devices need it)" >&2
  exit 2
fi
./scripts/bootstrap.sh
name=${LAB_NAME:-lab}
ctl=.venv/bin/overlayctl
if [[ -d /run/overlay-lab/$name ]]; then
  echo "lab.sh: a lab named '$name' exists already; replacing it"
  "$ctl" lab down --name "$name"
fi
rc=0
"$ctl" lab up --name "$name" --nodes "${LAB_NODES:-3}" --backend vxlan "$@" || rc=$?
if ((rc == 2)); then
  echo "lab.sh: the lab could not be built; clean up with: $ctl lab down --name $name" >&2
elif ((rc != 0)); then
  echo "lab.sh: the connectivity matrix has failures (see above)" >&2
fi
echo "lab.sh: inspect with '$ctl lab status --name $name', tear down with '$ctl lab down --name $name'"
exit "$rc"
