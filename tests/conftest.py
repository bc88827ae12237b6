"""Test-session setup: keep any Ray started by the tests on 127.0.0.1 (read by Ray at import)."""

import os

if not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
