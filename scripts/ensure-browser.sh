#!/usr/bin/env bash
# Install Debian's Chromium for the browser tests (Playwright drives it; Playwright's own
# browser download cannot run here). Under CI the browser tests must run, so a failed
# install is an error there; elsewhere the tests skip with a reason.
set -u
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }
fi
if [ ! -x /usr/bin/chromium ]; then
  echo "ensure-browser: /usr/bin/chromium is missing (apt-get install chromium); browser tests will skip, or fail under CI=true" >&2
fi
exit 0
