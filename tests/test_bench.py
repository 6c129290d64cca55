"""`python -m spn bench`: checks every backend against the reference before timing, writes
its JSON record as it goes, and runs on the CPU (smoke tests, small cases)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import spn
from spn import bench

KEYS = {"batch", "channels", "height", "width", "mode", "pass", "backend", "us_per_image", "peak_extra_bytes"}


def test_cpu_smoke_run_writes_the_record(tmp_path):
    out = tmp_path / "r.json"
    assert bench.main(["--device", "cpu", "--quick", "--cases", "2,8,4", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert {"device", "torch", "cupy", "date", "cases", "validated"} <= set(record)
    assert record["complete"] is True
    assert record["torch"] == torch.__version__
    cases = record["cases"]
    assert cases and all(set(case) >= KEYS for case in cases)
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
    torch.manual_seed(0)
    u = torch.rand(2, 6, 5, 5, dtype=torch.float64)
    _, mine = bench.released_reimplementation(u)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", spn.ConvergenceWarning)
        _, library = spn.soft_proposal(u, backend="torch", epsilon=spn.released_epsilon, iterations=20, tolerance=1e-4)
    assert torch.allclose(mine, library, atol=1e-4, rtol=0)


def test_plain_power_iteration_is_the_20_step_walk():
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


def test_every_row_of_the_peak_table_is_reachable():
    """The first matching row wins: a name that contains another must come first."""
    for key, _, _ in bench.PEAKS:
        assert bench.peak_entry(f"NVIDIA {key}")[0] == key
    names = {
        "NVIDIA GH200 480GB": "GH200",
        "NVIDIA H200": "H200",
        "NVIDIA H20": "H20",
        "NVIDIA H100 80GB HBM3": "H100",
        "NVIDIA H100 PCIe": "H100 PCIe",
        "NVIDIA A100-SXM4-80GB": "A100",
        "NVIDIA A10": "A10",
        "NVIDIA L40S": "L40S",
        "NVIDIA L4": "L4",
    }
    for name, key in names.items():
        assert bench.peak_entry(name)[0] == key, name
    assert bench.peak_entry("Some Future GPU") is None


# -- validation against the reference -----------------------------------------------------------


def test_a_backend_with_a_wrong_map_writes_nothing_and_fails(monkeypatch, capsys, tmp_path):
    real = spn.soft_proposal

    def transposed(u, **options):  # an indexing bug: rows and columns swapped
        _coupled, proposal = real(u, **options)
        proposal = proposal.transpose(1, 2)
        return u * proposal.unsqueeze(1), proposal

    monkeypatch.setattr(spn, "soft_proposal", transposed)
    out = tmp_path / "results" / "r.json"
    assert bench.main(["--device", "cpu", "--quick", "--cases", "2,8,5", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "backend 'torch', mode 'paper', case B,K,S = 2,8,5, image 0" in err
    assert "the proposal map differs from the float64 reference" in err and "Nothing was written" in err
    assert not (tmp_path / "results").exists()


def test_wrong_coupled_features_are_caught_too(monkeypatch, capsys, tmp_path):
    real = bench.plain_power_iteration
    monkeypatch.setattr(bench, "plain_power_iteration", lambda u, eps: (real(u, eps)[0] * 1.01, real(u, eps)[1]))
    out = tmp_path / "r.json"
    assert bench.main(["--device", "cpu", "--quick", "--cases", "2,8,4", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "backend 'plain-torch'" in err and "the coupled features differ from U * M of the reference" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_later_image_of_the_batch_is_checked(monkeypatch, tmp_path):
    real = bench.released_reimplementation

    def last_image_uniform(u):
        _coupled, proposal = real(u)
        proposal = proposal.clone()
        proposal[-1] = 1.0 / proposal[-1].numel()
        return u * proposal.unsqueeze(1), proposal

    monkeypatch.setattr(bench, "released_reimplementation", last_image_uniform)
    plans = [p for p in bench._plans(["released-reimpl"])]
    u = torch.rand(3, 6, 5, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(bench.Mismatch, match=r"released-reimpl.*image 2"):
        bench.validate(plans, u, (3, 6, 5))


def test_the_released_reimplementation_is_checked_one_step_before_the_reference_stops():
    """The re-implementation passes; stopping two steps early, or running all 20, it fails."""
    u = torch.rand(2, 8, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    bench.validate([("released-reimpl", "released", bench.released_reimplementation)], u, (2, 8, 6))
    # tolerance 1e-4 -> 1e-2: it stops too early
    early = lambda x: bench.released_reimplementation(x, tolerance=1e-2)  # noqa: E731
    with pytest.raises(bench.Mismatch, match="released-reimpl"):
        bench.validate([("released-reimpl", "released", early)], u, (2, 8, 6))


# -- the record: written as the cases come, atomically ------------------------------------------


def test_results_are_on_disk_after_the_first_case(monkeypatch, tmp_path):
    """A run that dies during the second case leaves the first case's records, whole."""
    out = tmp_path / "r.json"
    real = bench.measure
    calls = []

    def measure(fn, timer, quick):
        calls.append(1)
        if len(calls) == 7:  # 6 timings of backend 'torch' per case: the second case starts
            snapshot = json.loads(out.read_text())
            assert snapshot["complete"] is False
            assert {(c["batch"], c["channels"], c["height"]) for c in snapshot["cases"]} == {(2, 8, 4)}
            assert len(snapshot["cases"]) == 6
            raise KeyboardInterrupt
        return real(fn, timer, quick)

    monkeypatch.setattr(bench, "measure", measure)
    with pytest.raises(KeyboardInterrupt):
        bench.main(
            ["--device", "cpu", "--quick", "--backends", "torch", "--cases", "2,8,4", "1,4,3", "--out", str(out)]
        )
    assert len(calls) == 7
    record = json.loads(out.read_text())
    assert record["complete"] is False and len(record["cases"]) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind


def test_the_record_is_replaced_whole_or_not_at_all(monkeypatch, tmp_path):
    out = tmp_path / "r.json"
    bench.write_atomically(out, {"cases": [1]})

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bench.json, "dumps", broken)
    with pytest.raises(OSError, match="disk full"):
        bench.write_atomically(out, {"cases": [1, 2]})
    assert json.loads(out.read_text()) == {"cases": [1]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_the_cpu_run_uses_the_cpu_cases(monkeypatch, tmp_path):
    validated, timed = [], []
    monkeypatch.setattr(bench, "validate", lambda plans, u, case: validated.append(case))
    monkeypatch.setattr(bench, "measure", lambda fn, timer, quick: timed.append(1) or (1e-3, None, 1))
    assert bench.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "r.json")]) == 0
    assert validated == list(bench.CPU_CASES)
    record = json.loads((tmp_path / "r.json").read_text())
    assert {(c["batch"], c["channels"], c["height"]) for c in record["cases"]} == set(bench.CPU_CASES)
    # every CPU case is at most as large as the largest that ran in about a minute on 2 cores
    assert all(b * k * (s * s) ** 2 <= 16 * 512 * 196**2 * 2 for b, k, s in bench.CPU_CASES)
