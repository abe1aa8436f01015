"""The study's figures (matplotlib, no pyplot, no torch)."""
