"""The fixtures of the browser tests: the site, built as tests/test_docs.py builds it."""

from tests.test_docs import site

__all__ = ["site"]
