"""The test suite: one module per package module (test_<module>.py), plus end-to-end suites; shared helpers in
``tests/helpers.py``, shared fixtures in ``tests/conftest.py``."""
