"""Low-level checkpoint file formats: safe unpickling and torch_dist (distributed checkpoint) I/O.

Nothing here imports NeMo or megatron: these modules must work where neither is installed.
"""
