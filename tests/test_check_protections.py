"""scripts/check_protections.py still points at the code that protects (it removes each piece
in turn and expects the fault tests to fail; see docs/reliability.md)."""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_protection_is_where_the_script_looks():
    path = ROOT / "scripts" / "check_protections.py"
    spec = importlib.util.spec_from_file_location("check_protections", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    assert len(module.CASES) >= 10
    for case in module.CASES:
        assert case.present in (ROOT / case.path).read_text(), case.protection
        assert (ROOT / case.tests[0]).is_file(), case.tests
