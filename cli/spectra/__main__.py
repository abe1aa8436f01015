"""``python -m cli.spectra``: the same program as ``collapse-spectra`` (torchrun launches it this way)."""

from cli.spectra import main

main()
