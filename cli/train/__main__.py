"""``python -m cli.train``: the same program as ``collapse-train`` (torchrun launches it this way)."""

from cli.train import main

main()
