"""benchmarks/compare_cpu_kernels.py: the harness's table parsed, builds alternated, statistics per build."""

import importlib.util
import stat
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_cpu_kernels.py"
_spec = importlib.util.spec_from_file_location("compare_cpu_kernels", _SCRIPT)
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

_TABLE = """isa avx512, 1 thread, B=64 F=39 D=16 L=3 float32, best of 3 calls in CPU time; FMA peak 160.0 GFLOP/s

| interaction | pass | ms | useful GFLOP/s | of FMA peak |
|---|---|---|---|---|
| inner | fwd | {fwd} | 80.0 | 50% |
| inner | bwd | 1.50 | 60.0 | 37% |
"""


def _fake_build(tmp_path: Path, name: str, times: list[float]) -> str:
    """An executable printing the harness's table with the next of `times` as the inner fwd ms."""
    counter = tmp_path / f"{name}.count"
    counter.write_text("0")
    script = tmp_path / name
    script.write_text(
        "#!/usr/bin/env python3\n"
        "from pathlib import Path\n"
        f"c = Path({str(counter)!r}); k = int(c.read_text()); c.write_text(str(k + 1))\n"
        f"times = {times!r}\n"
        f"print({_TABLE!r}.format(fwd=times[k]))\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_parse_rows_reads_only_the_table():
    rows = compare.parse_rows(_TABLE.format(fwd="0.42"))
    assert rows == {("inner", "fwd"): 0.42, ("inner", "bwd"): 1.5}


def test_builds_alternate_and_report_min_quartile_median(tmp_path, capsys):
    a = _fake_build(tmp_path, "a", [4.0, 1.0, 3.0, 2.0, 5.0])
    b = _fake_build(tmp_path, "b", [9.0, 7.0, 8.0, 6.0, 10.0])
    assert compare.main([a, b, "--rounds", "5", "--args", "--reps 1"]) == 0
    out = capsys.readouterr().out
    assert f"| inner | fwd | {a} | 1.00 | 2.00 | 3.00 |" in out
    assert f"| inner | fwd | {b} | 6.00 | 7.00 | 8.00 |" in out
    assert f"| inner | bwd | {b} | 1.50 | 1.50 | 1.50 |" in out
    # Each build ran once per round.
    assert (tmp_path / "a.count").read_text() == "5" and (tmp_path / "b.count").read_text() == "5"


def test_a_build_that_fails_or_prints_no_table_is_an_error(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.write_text("#!/bin/sh\necho nothing here\n")
    bad.chmod(bad.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(SystemExit):
        compare.main([str(bad), "--rounds", "1"])
    assert "printed no timing table" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path / "missing"), "--rounds", "1"])
    assert "cannot run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main([str(bad), "--rounds", "0"])
    assert "--rounds" in capsys.readouterr().err
