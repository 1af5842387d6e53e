"""The test suite: `python -m pytest -q tests` (README); shared helpers in helpers.py."""
