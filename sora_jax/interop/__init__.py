"""Weights in and out: released checkpoints into run folders (``import-weights``)."""
