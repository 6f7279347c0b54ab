"""Built-in workbench plugins, registered through the ``workbench.plugins`` entry-point group exactly
like third-party packages (see ``pyproject.toml``)."""
