"""Cyphr's test suite: ``trial tests``."""
