"""``python -m workbench``: the command line, for environments without the ``workbench`` script."""

from workbench.cli import main

main(prog_name="workbench")
