"""Runtimes for outputs that are more than a dense checkpoint (``mola``: routed LoRA experts)."""
