"""The latency benchmark runs end to end on a tiny shape and reports every table it was asked for."""
import json

import pytest

from dagfm_ext.bench import latency


def test_latency_tables_on_a_tiny_shape(tmp_path, capsys):
    out = tmp_path / "latency.json"
    argv = ["--batches", "1,3", "--interactions", "inner,kernel", "--shape", "3,4,1", "--calls", "10",
            "--throughput-batch", "8", "--json", str(out)]
    assert latency.main(argv) == 0
    text = capsys.readouterr().out
    assert "Raw op forward" in text and "Whole model forward" in text and "matmul rate" in text
    data = json.loads(out.read_text())
    assert [(r["interaction"], r["batch"]) for r in data["student"]] == [
        ("inner", 1), ("inner", 3), ("kernel", 1), ("kernel", 3)]
    for row in data["op"]:
        assert 0 < row["t1_median_us"] <= row["t1_p99_us"]
    for row in data["throughput"]["rows"]:
        assert row["fused fwd / matmul"] > 0 and row["fused fwd+bwd / matmul"] > 0


def test_time_calls_counts_and_orders():
    t = latency.time_calls({"a": lambda: None, "b": lambda: sum(range(100))}, calls=40, rounds=4, warmup=1)
    assert t["a"]["n"] == 40 and t["b"]["n"] == 40
    assert t["a"]["median_s"] <= t["a"]["p99_s"]


@pytest.mark.parametrize("argv", [["--interactions", "cross"], ["--shape", "3,4"]])
def test_bad_options_exit_2(argv, capsys):
    assert latency.main(argv + ["--skip", "op,student,throughput"]) == 2
    assert "--" in capsys.readouterr().err


def test_bench_latency_option_runs_the_latency_tool(tmp_path):
    """`dagfm-ext bench --latency` reaches the latency tool (its own options, its own report)."""
    from dagfm_ext.cli import main
    out = tmp_path / "latency.json"
    argv = ["bench", "--latency", "--batches", "1", "--interactions", "inner", "--shape", "3,2,1",
            "--calls", "3", "--skip", "throughput", "--json", str(out)]
    assert main(argv) == 0 and out.is_file()
