"""``workbench zoo report``: the miniature counterparts of the papers' headline tables, one module per section."""
