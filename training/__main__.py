"""``python -m training`` (and ``torchrun -m training``) run the ``train`` command."""

from training.cli import main

main()
