"""Debian's Chromium for Playwright (its own browser download is never used): where it is, and
how it starts here."""

from __future__ import annotations

import os
import shutil

# As root and with no network: no sandbox, no GPU, and none of Chromium's own calls home (each
# one is refused here and slows the page).
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_HINT = (
    "The browser tests need Chromium from the OS packages (Playwright's own browser download "
    "is not used). Run `make setup` (it runs `apt-get install chromium`), install it yourself "
    "(`sudo apt-get install chromium`), or point CHROMIUM_BIN at a Chromium or Chrome binary."
)


def find_chromium() -> str | None:
    candidates = [
        os.environ.get("CHROMIUM_BIN"),
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        "/usr/bin/chromium",
    ]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None
