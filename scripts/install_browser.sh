#!/usr/bin/env bash
# Install the browser of the browser tests: Debian's `chromium` package, at /usr/bin/chromium, which
# the tests drive headless with Playwright for Python (installed by scripts/setup.sh from the lock).
# Playwright's own browser download (`playwright install`) is not used: the tests launch
# executable_path="/usr/bin/chromium". Does nothing when /usr/bin/chromium is there, so it is safe
# to rerun; otherwise it runs, as root or through sudo, non-interactively:
#   apt-get update && apt-get install -y --no-install-recommends chromium
# and stops with a message naming the fix where it cannot (no apt-get, not root and no sudo).
set -euo pipefail
chromium=/usr/bin/chromium
fix="install Debian's chromium package as root: apt-get update && apt-get install -y --no-install-recommends chromium"

if [ ! -x "$chromium" ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser.sh: $chromium is missing and there is no apt-get here (not Debian/Ubuntu)." >&2
    echo "install_browser.sh: the browser tests need Chromium at $chromium; install it with this system's package manager, or on Debian/Ubuntu: $fix" >&2
    exit 1
  fi
  if [ "$(id -u)" -eq 0 ]; then
    as_root=()
  elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
  else
    echo "install_browser.sh: $chromium is missing, and installing it needs root: not root and no sudo here." >&2
    echo "install_browser.sh: fix: $fix" >&2
    exit 1
  fi
  echo "install_browser.sh: $chromium is missing; installing Debian's chromium package"
  if ! "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update \
    || ! "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; then
    echo "install_browser.sh: apt-get could not install chromium; fix: $fix" >&2
    exit 1
  fi
  if [ ! -x "$chromium" ]; then
    echo "install_browser.sh: apt-get installed chromium but $chromium is still missing; fix: $fix" >&2
    exit 1
  fi
fi
# Chromium's launcher script runs fine as root for --version; the tests pass --no-sandbox themselves.
version=$("$chromium" --version 2>/dev/null) || {
  echo "install_browser.sh: $chromium is there but \`$chromium --version\` fails; reinstall it: $fix" >&2
  exit 1
}
echo "browser ready: $chromium ($version)"
