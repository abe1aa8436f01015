"""The report's sections, one function each: ``section(ctx, writer) -> list[Block]``.

:data:`SECTIONS` is the order the report composes them in; a section that has nothing to show says why
(a :class:`~spectra.report.document.NotApplicable` block) instead of disappearing.
"""

from spectra.report.sections.dynamics import dynamics_section
from spectra.report.sections.evals import evals_section
from spectra.report.sections.gamma import gamma_section
from spectra.report.sections.learning_rate import learning_rate_section
from spectra.report.sections.measurement import sensitivity_section
from spectra.report.sections.overview import caveats_section, overview_section
from spectra.report.sections.provenance import provenance_section
from spectra.report.sections.runs import comparisons_section, headline_section, plan_section
from spectra.report.sections.surgery import surgery_section
from spectra.report.sections.trajectories import (
    data_complexity_section,
    loss_section,
    shape_section,
    trajectories_section,
)

SECTIONS = (
    overview_section,
    caveats_section,
    plan_section,
    learning_rate_section,
    headline_section,
    comparisons_section,
    sensitivity_section,
    trajectories_section,
    dynamics_section,
    shape_section,
    data_complexity_section,
    loss_section,
    evals_section,
    gamma_section,
    surgery_section,
    provenance_section,
)

__all__ = ["SECTIONS"]
