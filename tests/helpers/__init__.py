"""Test helpers that ship with the tests, not with the package."""
