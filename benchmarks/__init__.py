"""Reproducible performance measurements (not tests): every claim is a ratio measured side by side."""
