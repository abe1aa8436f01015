"""The plan of a public model's extraction: what a ``--revisions`` selection resolves to, without downloading.

``collapse-spectra extract SOURCE --revisions SELECTION --list-revisions`` prints :meth:`PublicPlan.lines`.
The source's revisions are listed (``list_repo_refs`` on the hub, the sub-directories of a directory) and,
with ``--out`` naming an existing cube, the steps it already holds are marked. No weights are read, and neither
torch nor transformers is imported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from spectra.cube import open_cube
from spectra.hf.revisions import RevisionPlan, parse_source, plan_revisions


@dataclass(frozen=True)
class PublicPlan:
    """What ``extract`` would do with a selection (:func:`plan_public`), without downloading weights."""

    plan: RevisionPlan
    in_cube: frozenset[int]
    """Steps the existing cube already holds (they would be skipped)."""
    cube_note: str | None
    """Why the cube at ``--out`` would be refused, if it would."""

    def lines(self) -> list[str]:
        """The plan as text (:meth:`spectra.hf.revisions.RevisionPlan.describe`)."""
        return self.plan.describe(done=self.in_cube) + ([self.cube_note] if self.cube_note else [])


def plan_public(
    source: str | os.PathLike,
    *,
    revisions: str | Sequence[str] | None = None,
    tokens_per_step: int | None = None,
    out: str | os.PathLike | None = None,
) -> PublicPlan:
    """The revisions a selection resolves to, listing the source's revisions (``list_repo_refs`` on the hub,
    the sub-directories of a directory) without downloading any weights; with ``out``, which of their steps
    the cube there already holds.

    Raises
    ------
    SpectraError
        An unknown source, a malformed selection, a hub that cannot be asked (offline mode, no network).
    """
    src = parse_source(source)
    plan = plan_revisions(src, revisions, tokens_per_step=tokens_per_step, listing=True)
    in_cube, cube_note = frozenset(), None
    if out is not None and Path(out).exists():
        cube = open_cube(out)
        if str(cube.attrs.get("model_id")) == src.model_id:
            in_cube = frozenset(int(s) for s in cube.step.values)
        else:
            holder = cube.attrs.get("model_id", "a collapse run")
            cube_note = f"{out} holds a cube of {holder!r}: extraction would refuse it"
    return PublicPlan(plan, in_cube, cube_note)


__all__ = ["PublicPlan", "plan_public"]
