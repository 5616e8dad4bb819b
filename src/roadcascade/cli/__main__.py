"""``python -m roadcascade.cli``."""

from . import main

main()
