"""benchmarks/data_speed.py: a tiny run times every source and prints its table, step and verdicts; copies are kept."""

import sys

import pytest
from test_cli import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import data_speed


def test_a_tiny_run_prints_every_source_and_keeps_its_copies(tmp_path, capsys, monkeypatch):
    # The step is bench.py's (tests/test_bench.py times it); a fixed speed here spares its seconds.
    monkeypatch.setattr(data_speed, "step_speed", lambda *args: 1e9)
    out = tmp_path / "speed"
    data_speed.main(["--count", "300", "--batches", "1", "--warmup", "1", "--workers", "0", "--out", str(out)])
    printed = capsys.readouterr().out
    assert printed.startswith("CPU: ")
    for source in data_speed.SOURCES:
        assert any(line.split()[:2] == [source, "0"] for line in printed.splitlines()), printed
        assert f"{source}: loader-bound" in printed  # no loader gives a billion images a second
    assert "training step (configs/cifar10.yaml, batch 128, float32, cpu): 1,000,000,000.0 img/s" in printed
    for copy in ("images", "hf", "streaming"):
        assert (out / copy / data_speed.DONE).read_text() == "300"
    with pytest.raises(SystemExit, match="holds 300 images, not --count 400"):
        data_speed.main(["--count", "400", "--out", str(out)])
