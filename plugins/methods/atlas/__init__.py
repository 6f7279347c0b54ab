"""aTLAS: the plugin and the training of its anisotropic coefficients."""
