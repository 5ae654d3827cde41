"""`tunesmith selftest`: one command that shows training works on this machine (issue 19).

``run.py`` runs the checks and writes the reports, ``checks.py`` holds the checks in order, ``workspace.py`` the
models and data they build on the spot (offline), ``measure.py`` step times, peak memory and MFU, ``probes.py`` the
NEFTune noise probe the tests share. See docs/gpu.md.
"""
