"""Test-only helpers for the vLLM serving tests (fixtures, subprocess drivers)."""
