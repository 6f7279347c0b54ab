"""The ``workbench`` command line (a face): one module per command group, helpers in ``common``."""
