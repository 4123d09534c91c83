"""Calibration and evaluation text: sources, tokenisation, windows.

The package imports nothing itself, so the recipe schema can read :mod:`compress.calibration.suites`
without torch; import the parts from their modules (``compress.calibration.sources`` etc.).
"""
