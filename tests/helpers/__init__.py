"""Helpers of the test suite (not shipped with the packages)."""
