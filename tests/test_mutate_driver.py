"""The mutation-testing driver (``scripts/mutate.py``) on a toy module: which mutants it makes, how it applies
them, and one end-to-end run that finds the survivors a weak toy test leaves (a few seconds)."""

import importlib.util
import sys
import textwrap

import pytest

from tests.helpers import REPO

_spec = importlib.util.spec_from_file_location("lr_mutate", REPO / "scripts" / "mutate.py")
mutate = importlib.util.module_from_spec(_spec)
sys.modules["lr_mutate"] = mutate
_spec.loader.exec_module(mutate)

TOY = textwrap.dedent('''\
    """A toy module."""

    __all__ = ["clamp", "is_adult"]


    def clamp(x: int, lo: int = 0, hi: int = 10) -> int:
        """Docstring: not mutated."""
        if lo > hi:
            raise ValueError(f"Expected lo <= hi, but got {lo + 1 - 1} > {hi}.")
        return min(max(x, lo), hi)


    def is_adult(age):
        return age >= 18 and not age > 200


    def ignored(a):
        return a + 1  # pragma: no mutate
    ''')

WEAK_TESTS = textwrap.dedent('''\
    from lightning_reweight.toy import clamp, is_adult


    def test_clamp():
        assert clamp(5) == 5 and clamp(-1) == 0 and clamp(11) == 10


    def test_adult():
        assert is_adult(30) and not is_adult(5)
    ''')


def _whats(mutants):
    return [(m.line, m.op, m.what) for m in mutants]


def test_generate_skips_messages_annotations_docstrings_and_pragmas():
    ms = mutate.generate(TOY, "toy.py")
    whats = _whats(ms)
    assert (8, "cmp", "> -> >=") in whats
    assert (9, "raise", "raise deleted") in whats
    assert (10, "return", "return value -> None") in whats
    assert (14, "boolop", "and -> or") in whats and (14, "not", "not x -> x") in whats
    assert (14, "const", "18 -> 19") in whats and (14, "const", "18 -> 17") in whats
    assert (14, "cmp", ">= -> >") in whats
    assert not any(m.line == 9 and m.op != "raise" for m in ms)  # the message is frozen
    assert {m.what for m in ms if m.line == 6} == {"0 -> 1", "0 -> -1", "10 -> 11", "10 -> 9"}  # defaults only
    lines = {m.line for m in ms}
    assert 18 not in lines  # pragma
    assert 3 not in lines and 1 not in lines and 7 not in lines  # __all__, the docstrings
    assert ms == mutate.generate(TOY, "toy.py")  # deterministic
    assert {m.op for m in mutate.generate(TOY, "toy.py", ops=("cmp",))} == {"cmp"}


def test_apply_changes_exactly_one_thing():
    ms = {m.what: m for m in mutate.generate(TOY, "toy.py") if m.line == 14}
    assert "age > 18" in mutate.apply(TOY, ms[">= -> >"])
    assert "age >= 18 or not age > 200" in mutate.apply(TOY, ms["and -> or"])
    assert "age >= 18 and age > 200" in mutate.apply(TOY, ms["not x -> x"])
    raise_deleted = next(m for m in mutate.generate(TOY, "toy.py") if m.op == "raise")
    out = mutate.apply(TOY, raise_deleted)
    assert "raise" not in out and "pass" in out
    compile(out, "toy.py", "exec")
    assert "return None" in mutate.apply(TOY, next(m for m in mutate.generate(TOY, "toy.py") if m.op == "return"))


def test_status_codes():
    assert mutate._status(None) == "timeout"
    assert mutate._status(0) == "survived"
    assert mutate._status(1) == "killed" and mutate._status(2) == "killed"
    assert mutate._status(5) == "error"


def test_end_to_end_run_finds_the_survivors(tmp_path, capsys):
    (tmp_path / "lightning_reweight").mkdir()
    (tmp_path / "lightning_reweight" / "__init__.py").write_text("")
    (tmp_path / "lightning_reweight" / "toy.py").write_text(TOY)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_toy.py").write_text(WEAK_TESTS)
    out_json = tmp_path / "out.json"
    code = mutate.main(["toy.py", "--root", str(tmp_path), "--tests", "tests/test_toy.py", "--subprocess",
                        "--ops", "raise,cmp", "--timeout", "60", "--json", str(out_json), "-q"])
    assert code == 0
    report = capsys.readouterr().out
    assert "| `toy.py` |" in report
    assert "toy.py:9  [raise] raise deleted" in report  # no test reaches the raise
    assert (tmp_path / "lightning_reweight" / "toy.py").read_text() == TOY  # the tree is never modified
    import json

    results = json.loads(out_json.read_text())["toy.py"]
    status = {(r["line"], r["what"]): r["status"] for r in results}
    assert status[(9, "raise deleted")] == "survived"
    assert status[(8, "> -> >=")] == "survived"  # lo == hi is never tested
    assert status[(14, ">= -> >")] == "survived"  # the boundary 18 is never tested
    assert status[(14, "> -> >=")] == "survived"  # nor 200
    assert len(status) == 4


def test_cli_refuses_unknown_modules_and_operators(tmp_path):
    with pytest.raises(SystemExit):
        mutate.main(["nope.py", "--list"])
    with pytest.raises(SystemExit):
        mutate.main(["rules/instance.py", "--ops", "flip", "--list"])
