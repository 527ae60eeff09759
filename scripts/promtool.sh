#!/usr/bin/env bash
# Put Prometheus's `promtool` at $1 (default .venv/bin/promtool) for the monitoring tests
# (tests/unit/test_monitoring.py: `promtool check rules|config` and the alert rules' unit tests).
# Uses a promtool on PATH when there is one; otherwise unpacks it from Debian's `prometheus`
# package (apt-get download: no root, nothing installed, the daemon never runs).
set -euo pipefail
dest="${1:-.venv/bin/promtool}"
if found=$(command -v promtool 2>/dev/null); then
  ln -sf "$found" "$dest"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
  echo "error: promtool not found and no apt-get/dpkg-deb to fetch it; install Prometheus's promtool (e.g. the 'prometheus' package) and put it on PATH" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download prometheus >/dev/null 2>&1) || {
  echo "error: could not download Debian's 'prometheus' package for promtool (apt-get download prometheus; try apt-get update)" >&2
  exit 1
}
dpkg-deb -x "$work"/prometheus_*.deb "$work/x"
install -m 0755 "$work/x/usr/bin/promtool" "$dest"
"$dest" --version 2>&1 | head -1
