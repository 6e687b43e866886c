#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test attnkit (needs root or sudo).
set -euo pipefail
packages=(cmake g++ make libeigen3-dev catch2 libbenchmark-dev pkg-config clang libclang-rt-14-dev
          nlohmann-json3-dev g++-aarch64-linux-gnu qemu-user-static gnuplot-nox doxygen)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "attnkit: installing ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
