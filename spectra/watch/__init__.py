"""Watch runs while they train: each checkpoint measured into its run's cube as it lands, beside TensorBoard.

- :mod:`spectra.watch.follow`: what a path holds (a run, a study, a directory of runs) and when it is over;
- :mod:`spectra.watch.scalars`: the numbers shown per checkpoint, those of ``collapse-spectra metrics``;
- :mod:`spectra.watch.tensorboard`: one run's TensorBoard scalars, never a point twice;
- :mod:`spectra.watch.figures`: a run's trajectory and heatmap, redrawn as its cube grows;
- :mod:`spectra.watch.loop`: :func:`~spectra.watch.loop.watch` itself, on the extraction code and lock of
  ``collapse-spectra extract`` (torch).

This file imports nothing, so that the torch-free modules above (follow, scalars, figures) can be imported
without torch (docs/watching.md).
"""
