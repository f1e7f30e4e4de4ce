"""Checkpoints: HuggingFace import/export and (later) orbax training state."""
