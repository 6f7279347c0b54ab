"""Optimal-transport fusion: the plugin, its parameters, the alignment by transport maps, the
transport primitives and the architecture layouts."""
