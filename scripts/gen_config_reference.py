"""Regenerate the configuration reference from the config parts: src/tunesmith/config_reference.json (what
`tunesmith COMMAND --help` prints, without importing torch) and docs/configuration.md.

    PYTHONPATH=src python scripts/gen_config_reference.py

Run it after changing a key, a default, a help text or a command; tests/test_config.py fails while either file is
stale."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "src")))

from tunesmith.reference import write  # noqa: E402

if __name__ == "__main__":
    changed = write()
    print("\n".join(f"wrote {p}" for p in changed) or "up to date")
