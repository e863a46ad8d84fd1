#!/bin/sh
# Print the path of a Chromium or Chrome for the browser tests, or nothing (exit 1) when
# there is none. Looks at $CIRCUITLAB_BROWSER, the PATH, then Playwright's own browsers.
# With --install, installs Debian's chromium first when none is found and apt-get can run
# as root (Playwright cannot download its browsers offline).
find_browser() {
  if [ -n "$CIRCUITLAB_BROWSER" ] && [ -x "$CIRCUITLAB_BROWSER" ]; then
    echo "$CIRCUITLAB_BROWSER"; return 0
  fi
  for name in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
  done
  for p in "$HOME"/.cache/ms-playwright/chromium-*/chrome-linux*/chrome \
           "$HOME"/Library/Caches/ms-playwright/chromium-*/chrome-mac*/Chromium.app/Contents/MacOS/Chromium; do
    if [ -x "$p" ]; then echo "$p"; return 0; fi
  done
  return 1
}

if [ "$1" = "--install" ] && ! find_browser >/dev/null && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null 2>&1; then
  apt-get update >&2 && apt-get install -y chromium >&2
fi
find_browser
