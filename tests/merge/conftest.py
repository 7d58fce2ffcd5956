"""Fixtures of the merge tests: the model zoo lives in merge_zoo.py."""

from merge_zoo import zoo  # noqa: F401  (a pytest fixture)
