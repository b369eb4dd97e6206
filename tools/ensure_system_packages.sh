#!/usr/bin/env bash
# Make sure the Debian packages a make target needs are installed.
# Usage: tools/ensure_system_packages.sh <command-that-must-exist>=<debian-package> ...
# Installs what is missing when apt-get is usable (root, or passwordless sudo); otherwise stops
# with a message naming the packages to install by hand.
set -euo pipefail

missing_packages=()
for pair in "$@"; do
  command_name=${pair%%=*}
  package=${pair#*=}
  if ! command -v "$command_name" >/dev/null 2>&1; then
    missing_packages+=("$package")
  fi
done
[ ${#missing_packages[@]} -eq 0 ] && exit 0

# De-duplicate (several commands may come from one package).
mapfile -t missing_packages < <(printf '%s\n' "${missing_packages[@]}" | sort -u)

if [ "$(id -u)" -eq 0 ]; then
  apt_prefix=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  apt_prefix=(sudo -n)
else
  apt_prefix=(none)
fi
if ! command -v apt-get >/dev/null 2>&1 || [ "${apt_prefix[0]:-}" = none ]; then
  echo "error: missing system packages: ${missing_packages[*]}" >&2
  echo "       apt-get is not usable here; install them with your package manager, e.g." >&2
  echo "       sudo apt-get install -y --no-install-recommends ${missing_packages[*]}" >&2
  exit 1
fi

echo ">> installing system packages: ${missing_packages[*]}"
export DEBIAN_FRONTEND=noninteractive
# A fresh machine has no package lists; an old list may miss the packages.
"${apt_prefix[@]}" apt-get update -qq
"${apt_prefix[@]}" apt-get install -y -qq --no-install-recommends "${missing_packages[@]}" >/dev/null
