#!/usr/bin/env bash
# Production install of overlayd on one host, as root (docs/daemon.md, "Production install"):
#   - a virtualenv of its own under PREFIX (default /opt/overlay) with its own pip, holding a
#     regular (not editable) install of overlay from SOURCE: nothing points back at a checkout;
#   - overlayd.service and /etc/default/overlayd from `overlayctl install-systemd` (hardened
#     unit, env file 0600 when it holds a password, a changed file refused without --force);
#   - the docs in /usr/share/doc/overlay, overlayd/overlayctl linked into /usr/local/bin;
#   - `systemctl enable --now overlayd` (unless --no-start).
# Unlike scripts/bootstrap.sh it installs no development tools and leaves every other service
# (etcd, mosquitto, ...) as it is. Needs python3 and python3-venv (Debian packages).
#
#   scripts/install-production.sh [--prefix DIR] [--source DIR] [--wheels DIR] [--force]
#                                 [--no-start] [--env FLANNELD_NAME=VALUE]...
#
# --source DIR   the overlay source tree or a wheel file to install (default: this checkout)
# --wheels DIR   install offline from the wheels in DIR (pip --no-index --find-links DIR)
# --env K=V      a setting for /etc/default/overlayd (repeatable); a password given here is
#                visible in `ps` while the script runs: for secrets, edit the file afterwards
# --force        replace a unit or environment file that differs from what would be written
# --no-start     install only (no enable/start)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=/opt/overlay
source_dir=$here
wheels=
force=()
start=1
envs=()
die() { echo "install-production.sh: $*" >&2; exit 2; }
while (($#)); do
  case $1 in
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --source) source_dir=${2:?--source needs a directory or wheel}; shift 2 ;;
    --wheels) wheels=${2:?--wheels needs a directory}; shift 2 ;;
    --env) envs+=(--env "${2:?--env needs FLANNELD_NAME=VALUE}"); shift 2 ;;
    --force) force=(--force); shift ;;
    --no-start) start=0; shift ;;
    *) die "unknown argument '$1' (see the comment at the top of this script)" ;;
  esac
done
[[ $(id -u) -eq 0 ]] || die "run as root"
[[ $prefix == /* && $prefix != *[[:space:]]* && $prefix != / ]] \
  || die "--prefix '$prefix': an absolute path without spaces, not /"
[[ -e $source_dir ]] || die "--source '$source_dir' does not exist"
[[ -z $wheels || -d $wheels ]] || die "--wheels '$wheels' is not a directory"
python=/usr/bin/python3  # a real interpreter, never a pyenv shim
[[ -x $python ]] || die "$python is missing: apt-get install python3 python3-venv"

if [[ ! -x $prefix/bin/pip ]]; then
  echo "install-production.sh: creating the virtualenv $prefix"
  "$python" -m venv "$prefix" || die "python3 -m venv failed: apt-get install python3-venv"
fi
pip=("$prefix/bin/pip" --disable-pip-version-check --quiet)
if [[ -n $wheels ]]; then
  pip+=(--no-cache-dir)
  "${pip[@]}" install --no-index --find-links "$wheels" "$source_dir"
else
  "${pip[@]}" install "$source_dir"
fi
for tool in overlayd overlayctl; do
  [[ -x $prefix/bin/$tool ]] || die "$prefix/bin/$tool is missing after the install"
done

"$prefix/bin/overlayctl" install-systemd --overlayd "$prefix/bin/overlayd" "${force[@]}" "${envs[@]}"

if [[ -d $here/docs ]]; then
  install -d -m 0755 /usr/share/doc/overlay
  install -m 0644 "$here"/docs/*.md /usr/share/doc/overlay/
fi
for tool in overlayd overlayctl; do
  ln -sfn "$prefix/bin/$tool" "/usr/local/bin/$tool"
done

if ((start)); then
  if [[ ! -d /run/systemd/system ]]; then
    echo "install-production.sh: systemd is not running here: start overlayd yourself" >&2
  else
    systemctl daemon-reload
    systemctl enable --now overlayd
    systemctl is-active overlayd
  fi
fi
echo "install-production.sh: overlayd installed ($prefix, /etc/systemd/system/overlayd.service, /etc/default/overlayd)"
