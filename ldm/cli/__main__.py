"""``python -m ldm.cli …`` (e.g. under ``torchrun``) runs the ``ldm`` command."""

from . import main

main()
