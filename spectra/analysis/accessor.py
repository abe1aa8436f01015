"""The ``.spectra`` accessor on xarray objects: a namespace that forwards to [`metrics`][spectra.analysis.metrics].

Accessors hold no state (xarray creates one per object and caches it): each method calls the metric
function of the same name on the wrapped object, so ``da.spectra.participation_ratio(convention="eig")`` is
``spectra.analysis.metrics.participation_ratio(da, convention="eig")``. Registered on ``import spectra``.
"""

from __future__ import annotations

from typing import Any, Literal

import pandas as pd
import xarray as xr

from spectra.analysis import metrics
from spectra.analysis.kernels import CONDITION_RTOL, RANKME_EPS
from spectra.analysis.summary import summary_table
from spectra.errors import SpectraError

__all__ = ["SpectraDataArrayAccessor", "SpectraDatasetAccessor"]


@xr.register_dataarray_accessor("spectra")
class SpectraDataArrayAccessor:
    """``DataArray.spectra``: effective-rank metrics of a singular-value array over ``dim``.

    Examples
    --------
    >>> import xarray as xr, spectra
    >>> sv = xr.DataArray([1.0, 1.0, 0.1], dims="sv")
    >>> round(float(sv.spectra.participation_ratio(convention="eig")), 4)
    2.0199
    """

    def __init__(self, obj: xr.DataArray):
        self._obj = obj

    def participation_ratio(self, convention: Literal["sv", "eig"] = "sv", dim: str = "sv") -> xr.DataArray:
        """See [`participation_ratio`][spectra.analysis.metrics.participation_ratio]."""
        return metrics.participation_ratio(self._obj, convention=convention, dim=dim)

    def energy_rank(self, threshold: float = 0.9, dim: str = "sv") -> xr.DataArray:
        """See [`energy_rank`][spectra.analysis.metrics.energy_rank]."""
        return metrics.energy_rank(self._obj, threshold=threshold, dim=dim)

    def condition_number(self, rtol: float | None = CONDITION_RTOL, dim: str = "sv") -> xr.DataArray:
        """See [`condition_number`][spectra.analysis.metrics.condition_number]."""
        return metrics.condition_number(self._obj, rtol=rtol, dim=dim)

    def effective_rank(self, dim: str = "sv") -> xr.DataArray:
        """See [`effective_rank`][spectra.analysis.metrics.effective_rank]."""
        return metrics.effective_rank(self._obj, dim=dim)

    def stable_rank(self, dim: str = "sv") -> xr.DataArray:
        """See [`stable_rank`][spectra.analysis.metrics.stable_rank]."""
        return metrics.stable_rank(self._obj, dim=dim)

    def rankme(self, eps: float = RANKME_EPS, dim: str = "sv") -> xr.DataArray:
        """See [`rankme`][spectra.analysis.metrics.rankme]."""
        return metrics.rankme(self._obj, eps=eps, dim=dim)

    def decay_exponent(
        self, first: int = 1, last: int | None = None, rtol: float = CONDITION_RTOL, dim: str = "sv"
    ) -> xr.DataArray:
        """See [`decay_exponent`][spectra.analysis.metrics.decay_exponent]."""
        return metrics.decay_exponent(self._obj, first=first, last=last, rtol=rtol, dim=dim)

    def compute(self, name: str, dim: str = "sv", **kwargs: Any) -> xr.DataArray:
        """See [`compute`][spectra.analysis.metrics.compute]."""
        return metrics.compute(self._obj, name, dim=dim, **kwargs)


@xr.register_dataset_accessor("spectra")
class SpectraDatasetAccessor:
    """``Dataset.spectra``: the same metrics on one spectrum variable of a cube, chosen by ``var``.

    Examples
    --------
    >>> import xarray as xr, spectra
    >>> ds = xr.Dataset({"k_sv": ("sv", [1.0, 0.0])})
    >>> float(ds.spectra.participation_ratio(var="k_sv"))
    1.0
    """

    def __init__(self, obj: xr.Dataset):
        self._obj = obj

    def _var(self, var: str) -> xr.DataArray:
        if var not in self._obj.data_vars:
            raise SpectraError(
                f"no variable {var!r}; the dataset has {', '.join(map(str, self._obj.data_vars))}"
            )
        return self._obj[var]

    def participation_ratio(
        self, var: str = "k_sv", convention: Literal["sv", "eig"] = "sv", dim: str = "sv"
    ) -> xr.DataArray:
        """See [`participation_ratio`][spectra.analysis.metrics.participation_ratio]."""
        return metrics.participation_ratio(self._var(var), convention=convention, dim=dim)

    def energy_rank(self, var: str = "k_sv", threshold: float = 0.9, dim: str = "sv") -> xr.DataArray:
        """See [`energy_rank`][spectra.analysis.metrics.energy_rank]."""
        return metrics.energy_rank(self._var(var), threshold=threshold, dim=dim)

    def condition_number(
        self, var: str = "k_sv", rtol: float | None = CONDITION_RTOL, dim: str = "sv"
    ) -> xr.DataArray:
        """See [`condition_number`][spectra.analysis.metrics.condition_number]."""
        return metrics.condition_number(self._var(var), rtol=rtol, dim=dim)

    def effective_rank(self, var: str = "k_sv", dim: str = "sv") -> xr.DataArray:
        """See [`effective_rank`][spectra.analysis.metrics.effective_rank]."""
        return metrics.effective_rank(self._var(var), dim=dim)

    def stable_rank(self, var: str = "k_sv", dim: str = "sv") -> xr.DataArray:
        """See [`stable_rank`][spectra.analysis.metrics.stable_rank]."""
        return metrics.stable_rank(self._var(var), dim=dim)

    def rankme(self, var: str = "k_sv", eps: float = RANKME_EPS, dim: str = "sv") -> xr.DataArray:
        """See [`rankme`][spectra.analysis.metrics.rankme]."""
        return metrics.rankme(self._var(var), eps=eps, dim=dim)

    def decay_exponent(
        self,
        var: str = "k_sv",
        first: int = 1,
        last: int | None = None,
        rtol: float = CONDITION_RTOL,
        dim: str = "sv",
    ) -> xr.DataArray:
        """See [`decay_exponent`][spectra.analysis.metrics.decay_exponent]."""
        return metrics.decay_exponent(self._var(var), first=first, last=last, rtol=rtol, dim=dim)

    def compute(self, name: str, var: str = "k_sv", dim: str = "sv", **kwargs: Any) -> xr.DataArray:
        """See [`compute`][spectra.analysis.metrics.compute]."""
        return metrics.compute(self._var(var), name, dim=dim, **kwargs)

    def summary_table(
        self,
        metric: str = "pr_sv",
        var: str = "k_sv",
        site: str | None = None,
        centering: str | None = None,
        **metric_kwargs: Any,
    ) -> pd.DataFrame:
        """See [`summary_table`][spectra.analysis.summary.summary_table]."""
        return summary_table(
            self._obj, metric=metric, var=var, site=site, centering=centering, **metric_kwargs
        )
