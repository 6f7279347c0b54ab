"""Optimal-transport fusion: the plugin, its transport primitives and the architecture layouts."""
