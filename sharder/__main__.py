"""``python -m sharder``: the same command as ``fineweb-sharder``."""

from sharder.cli import main

main()
