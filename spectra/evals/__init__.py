"""Downstream evals through lm-evaluation-harness: the run, the model wrapper, local tasks, results and scores."""
