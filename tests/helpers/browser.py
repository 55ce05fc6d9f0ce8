"""Debian's chromium and chromedriver, which the browser tests drive through selenium, and the
folder where they leave screenshots for a human to look at. The ``browser`` fixture is in
tests/integration/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.suite import PROJECT_ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = PROJECT_ROOT / "test-artifacts"

requires_chromium = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason=f"{CHROMIUM} and {CHROMEDRIVER} are needed (Debian: apt-get install chromium "
    "chromium-driver; .ci/run installs them)",
)
