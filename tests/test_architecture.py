"""The import boundaries of DESIGN.md stay true as modules are added."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# trainer.errors holds what trainer.config raises; trainer.provenance is the one record every writer of results uses
ALLOWED_FROM_TRAINER = {"trainer.model", "trainer.config", "trainer.errors", "trainer.provenance"}


def _contracts():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_spectra_contract_forbids_every_other_trainer_module():
    # import-linter can only forbid listed modules: check the list covers every top-level trainer module and
    # package but the allowed ones (a forbidden package covers every module under it)
    trainer = ROOT / "trainer"
    modules = {f"trainer.{p.stem}" for p in trainer.glob("*.py") if p.stem != "__init__"}
    modules |= {f"trainer.{p.parent.name}" for p in trainer.glob("*/__init__.py")}
    contract = next(c for c in _contracts() if c["source_modules"] == ["spectra"])
    assert modules - ALLOWED_FROM_TRAINER <= set(contract["forbidden_modules"])


def test_torch_free_modules_exist():
    contract = next(c for c in _contracts() if "torch" in c["forbidden_modules"])
    for module in contract["source_modules"]:
        path = ROOT / Path(*module.split("."))
        assert path.with_suffix(".py").exists() or (path / "__init__.py").exists(), (
            module
        )  # a module or package
