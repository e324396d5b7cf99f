"""Fuzz targets (``targets.py``) and atheris harnesses (``fuzz_*.py``)."""
