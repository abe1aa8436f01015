"""Revisions' files on disk: fetched from the hub into the Hugging Face cache, one ahead, and evicted when measured.

- :func:`fetch_revision`: a revision as a local model directory. A local source is used where it is; a hub
  revision goes through ``huggingface_hub.snapshot_download`` (its cache, ``HF_HUB_CACHE``, its offline mode, its
  token) with ``allow_patterns`` naming only ``config.json``, the tokenizer files and the safetensors weights
  (``model.safetensors``, or the shards ``model.safetensors.index.json`` names): pickle weights are never
  downloaded.
- :class:`SweepLedger`: which revisions a sweep brought into the cache. It records, beside the cube (a hidden
  ``.<cube>.hf-cache.json``), the commits of the model the cache held when the sweep began; a commit fetched
  later is the sweep's own. The record outlives a kill, so that the rerun still knows what is its own.
- :func:`evict`: a commit deleted from the cache through ``huggingface_hub``'s cache API (``scan_cache_dir()
  .delete_revisions(...).execute()``), which keeps blobs that another revision still uses.
- :func:`remove_partial_downloads`: the ``*.incomplete`` files a killed download left in the model's ``blobs/``;
  one whose download lock (``.locks/<repo>/<etag>.lock``, held by ``huggingface_hub`` while it writes) is taken
  belongs to a download in progress and is left alone.
- :class:`RevisionFetcher`: the revisions of an extraction in turn, the next one downloading in a background
  thread while the current one is measured, each evicted (when the sweep fetched it) once the caller says its
  spectra are in the cube. Disk then holds at most the revision being measured and the one being downloaded.

Imports neither torch nor transformers; ``huggingface_hub`` is imported when a hub source needs it.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from spectra.errors import SpectraError
from spectra.fileio import atomic_write
from spectra.hf.revisions import (
    CONFIG_FILE,
    PICKLE_WEIGHTS,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    TOKENIZER_FILE,
    FetchedRevision,
    ModelSource,
    Revision,
)

__all__ = [
    "LEDGER_FORMAT",
    "RevisionFetcher",
    "SweepLedger",
    "check_safetensors",
    "evict",
    "fetch_revision",
    "hub_cache_dir",
    "ledger_path",
    "remove_partial_downloads",
]

LEDGER_FORMAT = "collapse-hf-sweep-ledger"
"""The ``format`` of the record of a sweep's downloads."""
_LEDGER_VERSION = 1
_SMALL_FILES = (
    CONFIG_FILE,
    TOKENIZER_FILE,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    SAFETENSORS_INDEX,
)
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face cache in use: ``cache_dir``, else ``huggingface_hub``'s (``HF_HUB_CACHE``)."""
    if cache_dir is not None:
        return Path(cache_dir)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _repo_folder(repo: str) -> str:
    """The cache's folder of a model repository (``models--ORG--NAME``, the documented cache layout)."""
    return "models--" + repo.replace("/", "--")


# --------------------------------------------------------------------------------------------------------
# fetching one revision
# --------------------------------------------------------------------------------------------------------


def check_safetensors(directory: Path, what: str) -> None:
    """Refuse a model directory without safetensors weights, naming the pickle files it has instead."""
    if (directory / SAFETENSORS_FILE).is_file() or (directory / SAFETENSORS_INDEX).is_file():
        return
    pickles = [name for name in PICKLE_WEIGHTS if (directory / name).is_file()]
    found = f" (it has {', '.join(pickles)}: pickle weights, which are never loaded)" if pickles else ""
    raise SpectraError(
        f"{what}: no safetensors weights ({SAFETENSORS_FILE} or {SAFETENSORS_INDEX}) in {directory}{found}"
    )


def _snapshot(repo: str, label: str, patterns: Sequence[str], cache_dir: Path) -> Path:
    """``snapshot_download`` of the files matching ``patterns``, its errors as one line each."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(
            snapshot_download(repo, revision=label, allow_patterns=list(patterns), cache_dir=cache_dir)
        )
    except GatedRepoError:
        raise SpectraError(
            f"hf:{repo} is gated: accept its licence on the hub and log in (HF_TOKEN or `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise SpectraError(f"hf:{repo} has no revision {label!r}") from None
    except RepositoryNotFoundError:
        raise SpectraError(f"hf:{repo}: no such model on the hub (or it is private)") from None
    except LocalEntryNotFoundError:  # offline (or no network) and not in the cache, or only partly
        raise SpectraError(
            f"hf:{repo} revision {label!r} is not (wholly) in the local cache {cache_dir}, and the hub cannot be "
            "reached to download it (HF_HUB_OFFLINE is set, or no network)"
        ) from None


def _fetch_hub(source: ModelSource, rev: Revision, cache_dir: Path) -> FetchedRevision:
    """Config, tokenizer files and the weights' index first; then the weights that index (or none) names."""
    repo, label = source.model_id, rev.label
    directory = _snapshot(repo, label, _SMALL_FILES, cache_dir)
    if not (directory / CONFIG_FILE).is_file():
        raise SpectraError(f"hf:{repo} revision {label!r} has no {CONFIG_FILE}")
    index = directory / SAFETENSORS_INDEX
    weights = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else [SAFETENSORS_FILE]
    )
    directory = _snapshot(repo, label, weights, cache_dir)
    missing = [w for w in weights if not (directory / w).is_file()]
    if missing == [SAFETENSORS_FILE]:
        raise SpectraError(
            f"hf:{repo} revision {label!r} has no safetensors weights ({SAFETENSORS_FILE} or {SAFETENSORS_INDEX}) "
            "on the hub or, offline, in the local cache; pickle weights (pytorch_model.bin) are never loaded"
        )
    if missing:
        raise SpectraError(
            f"hf:{repo} revision {label!r}: shard {missing[0]} of {SAFETENSORS_INDEX} is missing"
        )
    return FetchedRevision(rev, directory, directory.name if _COMMIT_RE.match(directory.name) else "")


def fetch_revision(
    source: ModelSource, rev: Revision, *, cache_dir: str | os.PathLike | None = None
) -> FetchedRevision:
    """Make one revision available as a local model directory (downloading it from the hub if needed).

    Raises
    ------
    SpectraError
        A revision without safetensors weights (pickle weights are refused), an unknown or gated
        repository or revision, or files missing offline.
    """
    if source.kind == "hub":
        fetched = _fetch_hub(source, rev, hub_cache_dir(cache_dir))
    else:
        assert source.root is not None
        directory = source.root if rev.label == "." else source.root / rev.label
        fetched = FetchedRevision(rev, directory, "")
    what = f"{source.spec} revision {rev.label!r}" if rev.label != "." else source.spec
    check_safetensors(fetched.directory, what)
    return fetched


# --------------------------------------------------------------------------------------------------------
# what a sweep owns in the cache
# --------------------------------------------------------------------------------------------------------


def _cached_commits(repo: str, cache_dir: Path) -> dict[str, frozenset[str]]:
    """``{commit: its refs}`` of every revision of ``repo`` the cache holds (``scan_cache_dir``)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:  # no cache yet: it holds nothing
        return {}
    return {
        rev.commit_hash: frozenset(rev.refs)
        for cached in info.repos
        if cached.repo_type == "model" and cached.repo_id == repo
        for rev in cached.revisions
    }


def ledger_path(cube: str | os.PathLike) -> Path:
    """Where the record of a sweep's downloads into the cube ``cube`` lives: ``.<name>.hf-cache.json`` beside it."""
    cube = Path(cube)
    return cube.with_name(f".{cube.name}.hf-cache.json")


@dataclass(frozen=True)
class SweepLedger:
    """The commits of a model the cache held when a sweep into one cube began; later ones are the sweep's."""

    path: Path
    repo: str
    cache_dir: Path
    commits_before: frozenset[str]

    @classmethod
    def open(cls, cube: str | os.PathLike, repo: str, cache_dir: str | os.PathLike) -> SweepLedger:
        """The record of an interrupted sweep into ``cube`` from the same repository and cache, or a new one
        taken from the cache as it is now (written at once, so that a kill from here on leaves it)."""
        path, cache_dir = ledger_path(cube), Path(cache_dir).resolve()
        if path.exists():
            try:
                data = json.loads(path.read_text())
                same = (data["format"], data["repo"], data["cache_dir"]) == (
                    LEDGER_FORMAT,
                    repo,
                    str(cache_dir),
                )
                before = frozenset(data["commits_before"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise SpectraError(
                    f"{path}: not a readable record of a sweep's downloads ({e}); delete it (the revisions a "
                    "killed sweep downloaded then stay in the cache: `hf cache rm` removes them)"
                ) from None
            if same:
                return cls(path, repo, cache_dir, before)
        ledger = cls(path, repo, cache_dir, frozenset(_cached_commits(repo, cache_dir)))
        ledger._write()
        return ledger

    def _write(self) -> None:
        record = {
            "format": LEDGER_FORMAT,
            "format_version": _LEDGER_VERSION,
            "repo": self.repo,
            "cache_dir": str(self.cache_dir),
            "commits_before": sorted(self.commits_before),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "note": "commits of the model in the Hugging Face cache when this sweep began; later ones are the "
            "sweep's own and are evicted once measured (collapse-spectra extract --evict)",
        }
        atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))

    def owns(self, commit: str) -> bool:
        """Whether the sweep brought ``commit`` into the cache."""
        return bool(commit) and commit not in self.commits_before

    def leftovers(self, keep: Sequence[str] = ()) -> list[str]:
        """The sweep's commits still in the cache, except those a label in ``keep`` (still to measure) names."""
        return [
            commit
            for commit, refs in _cached_commits(self.repo, self.cache_dir).items()
            if self.owns(commit) and not refs & set(keep)
        ]

    def close(self) -> None:
        """The sweep is over and owns nothing more: remove the record."""
        self.path.unlink(missing_ok=True)


def evict(repo: str, commit: str, cache_dir: str | os.PathLike) -> int:
    """Delete one revision of ``repo`` from the cache (its snapshot, refs and the blobs no other revision uses)
    through ``huggingface_hub``'s cache API; the bytes freed."""
    from huggingface_hub import scan_cache_dir

    strategy = scan_cache_dir(cache_dir).delete_revisions(commit)
    strategy.execute()
    return strategy.expected_freed_size


def remove_partial_downloads(repo: str, cache_dir: str | os.PathLike) -> list[Path]:
    """Delete the ``*.incomplete`` files of ``repo`` that no download is writing; the paths removed.

    ``huggingface_hub`` writes a blob to ``blobs/<etag>.<random>.incomplete`` under the lock
    ``.locks/<repo folder>/<etag>.lock`` and renames it when complete; a process killed meanwhile leaves the
    file, which no later download reuses (the random part is its own). A lock that cannot be taken at once
    belongs to a download in progress, whose file stays.
    """
    from filelock import FileLock, Timeout
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache_dir = Path(cache_dir)
    try:
        partial = scan_cache_dir(cache_dir).incomplete_files
    except CacheNotFound:
        return []
    folder, removed = _repo_folder(repo), []
    for f in sorted(partial, key=lambda f: f.file_path):
        if f.file_path.parent.parent.name != folder:
            continue
        lock = FileLock(cache_dir / ".locks" / folder / f"{f.file_path.name.split('.')[0]}.lock", timeout=0)
        try:
            with lock:
                f.file_path.unlink(missing_ok=True)
                removed.append(f.file_path)
        except Timeout:
            continue
    return removed


# --------------------------------------------------------------------------------------------------------
# the revisions of an extraction, one ahead
# --------------------------------------------------------------------------------------------------------


def _in_background(fn: Callable[[], FetchedRevision]) -> Future[FetchedRevision]:
    """Run ``fn`` in a daemon thread: a Ctrl-C does not wait for a download to finish (its partial file is
    removed by the next run, :func:`remove_partial_downloads`)."""
    future: Future[FetchedRevision] = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as e:  # handed to the caller of result(), in the main thread
            future.set_exception(e)

    threading.Thread(target=run, name="collapse-fetch", daemon=True).start()
    return future


@contextmanager
def _hub_progress(enabled: bool) -> Iterator[None]:
    """``huggingface_hub``'s download bars off unless ``enabled`` (restored on exit)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


class RevisionFetcher:
    """The revisions ``todo`` as local model directories, in order, the next one fetched in the background.

    Use as a context manager: :meth:`next` returns the next revision (waiting for its download) and starts
    fetching the one after; :meth:`measured` says its spectra are in the cube, which evicts it when the sweep
    brought it into the cache (``ledger`` given: ``--evict``). On entry, partial downloads of the model that no
    download is writing are removed and, with a ledger, the sweep's revisions left by an earlier interrupted run
    that are not to be measured now are evicted; on exit, partial downloads are removed again and, when every
    revision was measured, the ledger is closed. A local source is read where it lies: no thread, no cache.
    """

    def __init__(
        self,
        source: ModelSource,
        todo: Sequence[Revision],
        *,
        cache_dir: str | os.PathLike | None = None,
        ledger: SweepLedger | None = None,
        progress: bool = False,
    ):
        self.source, self.todo, self.ledger, self.progress = source, list(todo), ledger, progress
        self.hub = source.kind == "hub"
        self.cache_dir = hub_cache_dir(cache_dir) if self.hub else None
        self.evicted: list[str] = []
        """Labels of the revisions evicted so far."""
        self.freed = 0
        """Bytes their eviction freed."""
        self._next = 0
        self._pending: Future[FetchedRevision] | None = None

    def __enter__(self) -> RevisionFetcher:
        if self.hub:
            remove_partial_downloads(self.source.model_id, self.cache_dir)
            if self.ledger is not None:
                for commit in self.ledger.leftovers(keep=[r.label for r in self.todo]):
                    evict(self.source.model_id, commit, self.cache_dir)
        self._start()
        return self

    def _fetch(self, rev: Revision) -> FetchedRevision:
        with _hub_progress(self.progress):
            return fetch_revision(self.source, rev, cache_dir=self.cache_dir)

    def _start(self) -> None:
        """Begin fetching ``todo[self._next]`` (in the background for the hub)."""
        if self._next >= len(self.todo):
            self._pending = None
            return
        rev = self.todo[self._next]
        if self.hub:
            self._pending = _in_background(lambda: self._fetch(rev))
        else:
            self._pending = Future()
            self._pending.set_result(fetch_revision(self.source, rev))

    def next(self) -> FetchedRevision:
        """The next revision, fetched (its download's error, if any, raised here); the one after starts."""
        if self._pending is None:
            raise IndexError("no revision left to fetch")
        fetched = self._pending.result()
        self._next += 1
        self._start()
        return fetched

    def will_evict(self, fetched: FetchedRevision) -> bool:
        """Whether :meth:`measured` will evict ``fetched`` (the sweep brought it into the cache, ``--evict``), so
        that its spectra must be written to the cube first."""
        return self.hub and self.ledger is not None and self.ledger.owns(fetched.commit)

    def measured(self, fetched: FetchedRevision) -> None:
        """``fetched``'s spectra are in the cube: evict it if the sweep brought it into the cache.

        The download of the next revision is waited for first: it is needed next anyway, and two branches may
        point to one commit (a commit the next revision uses is evicted after that one instead).
        """
        if not self.will_evict(fetched):
            return
        if self._pending is not None and self._pending.exception() is None:
            if self._pending.result().commit == fetched.commit:
                return
        self.freed += evict(self.source.model_id, fetched.commit, self.cache_dir)
        self.evicted.append(fetched.revision.label)

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if not self.hub:
            return
        if self._pending is None or self._pending.done():
            remove_partial_downloads(self.source.model_id, self.cache_dir)
        # else: a download still runs in its thread (an error or Ctrl-C interrupted the measurement); its lock
        # keeps its partial file, which the next run removes
        if self.ledger is not None and exc_type is None:
            for commit in self.ledger.leftovers():
                self.freed += evict(self.source.model_id, commit, self.cache_dir)
            self.ledger.close()
