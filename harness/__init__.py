"""Test and demo harness: real NeMo on a CPU-only machine. Never installed, and the plugin never imports it."""
