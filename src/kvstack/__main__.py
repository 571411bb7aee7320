"""``python -m kvstack``: the same CLI as the ``kvstack`` script."""

from kvstack.cli import main

main()
