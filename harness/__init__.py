"""Test and demo harness: real NeMo on a CPU-only machine. The plugin itself never imports this package."""
