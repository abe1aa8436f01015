"""NetCDF files opened lazily: the spectra as dask arrays, read from the file block by block when computed.

:func:`open_lazily` reads a file's metadata, its index coordinates and its variables over fewer than two
dimensions (``tokens``, the losses: a few numbers per step) at once, closes the file, and makes every other
variable a dask array whose blocks (along ``step``, up to dask's ``array.chunk-size``, 128 MiB by default) are
read when a computation needs them. Hundreds of cubes then open in bounded memory.

Each block read opens the file, reads and closes it again, under one lock, rather than keeping it open in
xarray's file cache: a file kept open there while the same file is opened and closed eagerly
(``xarray.load_dataset``, as :func:`spectra.cube.open_cube` does) crashes the netCDF4/HDF5 libraries (a
segmentation fault on the next open), and HDF5 is not thread-safe for dask's threads. The lock is xarray's own
HDF5 lock, the one its netCDF4 backend holds while it reads or writes: a lazily opened Dataset written with
``to_netcdf`` has its blocks read by dask's threads while xarray writes the output through HDF5, and with a lock
of our own the two overlapped and crashed the process (a segmentation fault in ``tests/test_cube_io.py``). Values are decoded as
xarray decodes them for the cube's variables: the fill value becomes NaN (the cube's spectra are floating point).
A read that fails (damaged bytes) is one line naming the file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import xarray as xr
from xarray.backends.locks import HDF5_LOCK

from spectra.errors import SpectraError

_NETCDF_LOCK = HDF5_LOCK
"""One HDF5 call at a time in this process, ours and xarray's alike: the library underneath is not thread-safe."""


def dask_installed() -> bool:
    """Whether ``dask`` can be imported (the ``dask`` extra): :func:`spectra.cube.open_cubes` is lazy then."""
    return importlib.util.find_spec("dask") is not None


def unreadable(file: Path, error: BaseException) -> SpectraError:
    """The one-line error for a file that cannot be read, naming it."""
    return SpectraError(f"{file}: not a readable NetCDF file, damaged or truncated? ({error})")


class _BlockReader:
    """One variable of a NetCDF file as dask reads it: ``reader[key]`` reads that block from the file."""

    def __init__(self, file: Path, name: str, shape: tuple[int, ...], dtype: np.dtype):
        self.file, self.name = file, name
        self.shape, self.dtype, self.ndim = shape, dtype, len(shape)

    def __getitem__(self, key: tuple) -> np.ndarray:
        import netCDF4

        try:
            with _NETCDF_LOCK, netCDF4.Dataset(self.file, "r") as nc:
                block = nc.variables[self.name][key]
        except (OSError, ValueError, RuntimeError, IndexError) as e:
            raise unreadable(self.file, e) from None
        if np.ma.isMaskedArray(block):
            block = block.filled(np.nan) if np.issubdtype(block.dtype, np.floating) else block.data
        return np.asarray(block, dtype=self.dtype)


def open_lazily(file: Path) -> xr.Dataset:
    """``file`` as a Dataset whose variables over two or more dimensions are dask arrays over it (module doc).

    Raises
    ------
    SpectraError
        The file is not NetCDF or cannot be decoded (now), or a block cannot be read (when computed).
    """
    import dask.array as da

    try:
        with xr.open_dataset(file, engine="netcdf4") as src:
            ds = src.copy()
            for name, variable in src.variables.items():
                if name in src.indexes or variable.ndim < 2:
                    ds[name] = variable.load()
                    continue
                reader = _BlockReader(file, name, variable.shape, variable.dtype)
                chunks = ("auto",) + (-1,) * (variable.ndim - 1)  # whole but along the first dimension (step)
                data = da.from_array(reader, chunks=chunks, name=f"{file}:{name}", meta=np.ndarray)
                ds[name] = variable.copy(data=data)
                ds[name].encoding = {}
    except (OSError, ValueError, RuntimeError) as e:
        raise unreadable(file, e) from None
    return ds
