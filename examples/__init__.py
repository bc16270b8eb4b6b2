"""Runnable examples of using recagent from other code (not installed with the package)."""
