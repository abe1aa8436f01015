"""How often phase detection finds the right number of breakpoints on noisy synthetic trajectories (not a test).

    python benchmarks/calibrate_breakpoints.py
    python benchmarks/calibrate_breakpoints.py --repeats 200 --noise 0.5 1.0

For each number of checkpoints (log-spaced over three decades of tokens) and each true shape (a straight decline
of 5 PR per decade; a plateau at 40 then a fall of 10 per decade from 10^6.5 tokens), it draws ``--repeats``
series with Gaussian noise of each ``--noise`` standard deviation and counts how many breakpoints the fit chooses,
with plain BIC (margin 0) and with the margin ``spectra.analysis.piecewise.BIC_MARGIN`` that the library uses. This is the
evidence behind that margin, quoted in ``spectra.analysis.piecewise`` and on docs/dynamics.md; it also prints the seconds
per fit.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from spectra.analysis import piecewise


def chosen(fit: piecewise.PiecewiseFit, margin: float) -> int:
    """The number of breakpoints BIC picks with ``margin`` (the library's rule, from the fit's per-k BIC)."""
    bic, k = fit.bic, 0
    for more in (1, 2):
        if np.isfinite(bic[more]) and bic[more] < bic[k] - margin:
            k = more
    return k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.5])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    margins = (0.0, piecewise.BIC_MARGIN)
    print(f"counts of 0 / 1 / 2 breakpoints chosen in {args.repeats} series; margins {margins}")
    for noise in args.noise:
        for n in args.points:
            tokens = np.geomspace(1e5, 1e8, n)
            x = np.log10(tokens)
            shapes = {
                "line (truth 0)": 40.0 - 5.0 * x,
                "plateau then fall (truth 1)": 40.0 - 10.0 * np.maximum(x - 6.5, 0),
            }
            for name, truth in shapes.items():
                counts = {m: np.zeros(3, dtype=int) for m in margins}
                start = time.perf_counter()
                for _ in range(args.repeats):
                    fit = piecewise.fit_piecewise(tokens, truth + rng.normal(0.0, noise, n))
                    for m in margins:
                        counts[m][chosen(fit, m)] += 1
                seconds = (time.perf_counter() - start) / args.repeats
                text = "   ".join(f"margin {m:g}: {' / '.join(map(str, c))}" for m, c in counts.items())
                print(f"noise {noise:g}  n={n:3d}  {name:28s} {text}   ({seconds:.3f} s per fit)")


if __name__ == "__main__":
    main()
