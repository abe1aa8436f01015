"""Pruning surgery: the test loss after removing key dimensions by gamma, by SVD or at random."""
