#!/usr/bin/env bash
# The README's picture: a headless-Chromium screenshot of the top of a run's report.html.
#   scripts/report_png.sh runs/<run>/report.html [docs/report.png]
set -euo pipefail
report=${1:?usage: scripts/report_png.sh RUN_DIR/report.html [OUT.png]}
out=${2:-docs/report.png}
[ -f "$report" ] || { echo "report_png: no such file: $report" >&2; exit 2; }
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "report_png: chromium is not on PATH (Debian: apt-get install chromium)" >&2; exit 2; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --virtual-time-budget=5000 \
  --hide-scrollbars --window-size=770,980 --screenshot="$(realpath -m "$out")" \
  "file://$(realpath "$report")" 2>/dev/null
echo "wrote $out"
