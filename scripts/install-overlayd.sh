#!/usr/bin/env bash
# Install overlayd as a systemd service on this host, as root: the steps of docs/daemon.md
# ("Install with systemd"), scripted. Used by the container lab's image (--no-start, the
# environment file is written per host at `lab up`) and by the Vagrantfile's provisioning.
#
#   scripts/install-overlayd.sh [--venv DIR] [--no-start] [--set KEY=VALUE]...
#
# --venv DIR      the virtualenv holding overlayd and overlayctl (default: this checkout's .venv,
#                 made by scripts/bootstrap.sh)
# --set KEY=VALUE a FLANNELD_* line for /etc/default/overlayd (repeatable; replaces the
#                 example's line for KEY, or is appended)
# --no-start      install only: no daemon-reload, enable or start (for image builds)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=$repo/.venv
start=1
sets=()
while (($#)); do
  case $1 in
    --venv) venv=${2:?--venv needs a directory}; shift 2 ;;
    --set) sets+=("${2:?--set needs KEY=VALUE}"); shift 2 ;;
    --no-start) start=0; shift ;;
    *) echo "install-overlayd.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
if [[ $(id -u) -ne 0 ]]; then
  echo "install-overlayd.sh: run as root" >&2
  exit 2
fi
for tool in overlayd overlayctl; do
  if [[ ! -x $venv/bin/$tool ]]; then
    echo "install-overlayd.sh: $venv/bin/$tool is missing: run scripts/bootstrap.sh first" >&2
    exit 2
  fi
  ln -sf "$venv/bin/$tool" "/usr/local/bin/$tool"
done
install -m 0644 "$repo/systemd/overlayd.service" /etc/systemd/system/overlayd.service
env_file=/etc/default/overlayd
if [[ ! -f $env_file ]]; then
  install -D -m 0600 "$repo/systemd/overlayd.env.example" "$env_file"
fi
for kv in "${sets[@]}"; do
  key=${kv%%=*}
  if [[ ! $key =~ ^FLANNELD_[A-Z0-9_]+$ || $kv != *=* || $kv == *$'\n'* ]]; then
    echo "install-overlayd.sh: --set '$kv': expected FLANNELD_NAME=value on one line" >&2
    exit 2
  fi
  # Drop the key's line (commented or not), then append the new one.
  sed -i -E "/^#?${key}=/d" "$env_file"
  printf '%s\n' "$kv" >>"$env_file"
done
if ((start)); then
  systemctl daemon-reload
  systemctl enable --now overlayd
  systemctl is-active overlayd
fi
echo "install-overlayd.sh: overlayd installed ($venv, unit /etc/systemd/system/overlayd.service, $env_file)"
