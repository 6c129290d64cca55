"""`python -m spn bench` runs and writes its JSON record (smoke test on the CPU)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from spn import bench

KEYS = {"batch", "channels", "height", "width", "mode", "pass", "backend", "us_per_image", "peak_extra_bytes"}


def test_cpu_smoke_run_writes_the_record(tmp_path):
    out = tmp_path / "r.json"
    assert bench.main(["--device", "cpu", "--quick", "--cases", "2,8,4", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert {"device", "torch", "cupy", "date", "cases"} <= set(record)
    assert record["torch"] == torch.__version__
    cases = record["cases"]
    assert cases and all(KEYS <= set(case) for case in cases)
    assert {case["backend"] for case in cases} >= {"torch", "plain-torch"}
    assert {case["pass"] for case in cases} == {"forward", "forward+backward"}
    for case in cases:
        assert (case["batch"], case["channels"], case["height"], case["width"]) == (2, 8, 4, 4)
        assert case["us_per_image"] > 0


def test_without_a_gpu_it_says_so_and_fails(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--quick", "--out", str(tmp_path / "r.json")]) != 0
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_bad_case_is_refused():
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--cases", "2,8"])


def test_released_reimplementation_matches_the_library_up_to_the_tolerance():
    """The benchmark's stand-in for the released code computes what spn.RELEASED computes
    (it discards the step that falls below the tolerance, the library keeps it)."""
    import spn

    torch.manual_seed(0)
    u = torch.rand(2, 6, 5, 5, dtype=torch.float64)
    _, mine = bench.released_reimplementation(u)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", spn.ConvergenceWarning)
        _, library = spn.soft_proposal(u, backend="torch", **spn.RELEASED)
    assert torch.allclose(mine, library, atol=1e-4, rtol=0)


def test_plain_power_iteration_is_the_20_step_walk():
    import spn

    torch.manual_seed(1)
    u = torch.rand(2, 6, 5, 5, dtype=torch.float64)
    eps = 0.15 * 25
    _, plain = bench.plain_power_iteration(u, eps)
    _, library = spn.soft_proposal(u, backend="torch", epsilon=eps, iterations=20)
    assert torch.allclose(plain, library, atol=1e-10, rtol=0)


def test_roofline_model():
    flop, moved = bench.model("paper", "forward", 512, 196)
    assert flop >= 3 * 512 * 196**2
    peak = {"flops": 67e12, "bytes": 3.35e12}
    assert bench.roofline_fraction(flop, moved, flop / 67e12, peak) == pytest.approx(1.0)
    assert bench.roofline_fraction(flop, moved, 1.0, {"flops": None, "bytes": None}) is None
