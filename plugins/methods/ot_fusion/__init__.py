"""Optimal-transport fusion: the plugin, its parameters, the alignment by transport maps, the primitives and the layouts."""
