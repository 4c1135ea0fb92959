"""SAGE core."""
