"""One adapter per checkpoint format, all reading into and writing from ``Checkpoint``."""
