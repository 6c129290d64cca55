"""I2C (spn.methods.i2c): each formula against a loop-by-loop evaluation, the pair sampler's
properties, option checks, and a training run through the harness (train, evaluate, resume)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from harness_checks import round_trip, torchrun, train_method
from spn.harness.checkpoint import load_checkpoint
from spn.methods import MethodError, Step, get_method
from spn.methods.i2c import (
    I2C,
    I2CHead,
    PairSampler,
    global_consistency,
    normalize_maps,
    object_seeds,
    pair_centres,
    seed_features,
    stochastic_consistency,
    update_centres,
)
from spn.models import CAMHead, Network, small_cam

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ---------------------------------------------------------------- formulas


def test_normalize_maps_by_hand():
    torch.manual_seed(0)
    maps = torch.randn(3, 4, 5)
    maps[2] = 7.0  # constant: all ones
    got = normalize_maps(maps)
    for b in range(3):
        values = [float(v) for v in maps[b].flatten()]
        low, high = min(values), max(values)
        for i in range(4):
            for j in range(5):
                expected = 1.0 if high == low else (float(maps[b, i, j]) - low) / (high - low)
                assert math.isclose(float(got[b, i, j]), expected, rel_tol=1e-6, abs_tol=1e-6)


def _region(map_2d: torch.Tensor, threshold: float, min_pixels: int) -> set[int]:
    values = [float(v) for v in map_2d.flatten()]
    low, high = min(values), max(values)
    normed = [1.0 if high == low else (v - low) / (high - low) for v in values]
    above = [i for i, v in enumerate(normed) if v > threshold]
    if len(above) >= min_pixels:
        return set(above)
    cut = threshold * max(normed)
    return {i for i, v in enumerate(normed) if v > cut}


@pytest.mark.parametrize("min_pixels", [0, 30])
def test_object_seeds_are_distinct_positions_of_the_region(min_pixels):
    torch.manual_seed(1)
    maps = torch.rand(6, 7, 7) ** 3
    seeds = object_seeds(maps, num_seeds=3, threshold=0.5, min_pixels=min_pixels)
    assert seeds.shape == (6, 3) and seeds.dtype == torch.long
    for b in range(6):
        region = _region(maps[b], 0.5, min_pixels)
        chosen = seeds[b].tolist()
        assert set(chosen) <= region
        assert len(set(chosen)) == min(3, len(region))


def test_object_seeds_small_region_cycles_and_relative_threshold():
    # normalised: one value above 0.7, two in (0.5, 0.7]: the region is the one position,
    # repeated; the rule's relative threshold is 0.7 * max = 0.7 (not lower)
    maps = torch.tensor([[[0.0, 0.6, 0.65], [0.1, 1.0, 0.2]]])
    assert object_seeds(maps, num_seeds=3, threshold=0.7, min_pixels=30).tolist() == [[4, 4, 4]]
    two = torch.tensor([[[0.0, 0.9, 0.0], [0.1, 1.0, 0.2]]])
    got = object_seeds(two, num_seeds=5, threshold=0.7, min_pixels=30)[0].tolist()
    assert sorted(set(got)) == [1, 4] and got[:2] == got[2:4] and got[4] == got[0]


def test_object_seeds_are_random_not_raster_order():
    maps = torch.zeros(1, 4, 4)
    maps[0, :2] = 1.0  # region: positions 0..7
    counts = torch.zeros(16)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        counts[object_seeds(maps, 3, generator=generator)[0]] += 1
    assert counts[8:].sum() == 0
    assert (counts[:8] > 40).all()  # each of the 8 drawn ~75 times; raster order would give 0 for 3..7
    a = object_seeds(maps, 3, generator=torch.Generator().manual_seed(5))
    b = object_seeds(maps, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_object_seeds_of_a_constant_map_are_anywhere():
    seeds = object_seeds(torch.full((2, 3, 3), 4.0), num_seeds=3)
    assert seeds.shape == (2, 3) and all(len(set(row)) == 3 for row in seeds.tolist())


def test_seed_features_by_hand():
    torch.manual_seed(2)
    features = torch.randn(2, 4, 3, 5)
    indices = torch.tensor([[0, 14, 7], [9, 9, 3]])
    got = seed_features(features, indices)
    for b in range(2):
        for j in range(3):
            row, col = divmod(int(indices[b, j]), 5)
            for c in range(4):
                assert float(got[b, j, c]) == float(features[b, c, row, col])


def test_stochastic_consistency_and_pair_centres_by_hand():
    torch.manual_seed(3)
    seeds = torch.randn(6, 3, 4)
    total = 0.0
    for i in range(3):
        for j in range(3):
            total += math.sqrt(sum((float(seeds[2 * i, j, c]) - float(seeds[2 * i + 1, j, c])) ** 2 for c in range(4)))
    assert math.isclose(float(stochastic_consistency(seeds)), total / 9, rel_tol=1e-6)
    centres = pair_centres(seeds)
    for i in range(3):
        for c in range(4):
            mean = sum(float(seeds[2 * i + k, j, c]) for k in range(2) for j in range(3)) / 6
            assert math.isclose(float(centres[i, c]), mean, rel_tol=1e-5, abs_tol=1e-6)


def test_global_consistency_by_hand_skips_classes_without_a_centre():
    torch.manual_seed(4)
    batch = torch.randn(4, 3, requires_grad=True)
    centres = torch.randn(5, 3)
    counts = torch.tensor([2, 0, 1, 0, 7])
    labels = torch.tensor([0, 1, 4, 2])
    got = global_consistency(batch, centres, counts, labels)
    known = [i for i in range(4) if int(counts[labels[i]]) > 0]
    expected = sum(
        math.sqrt(sum((float(batch[i, c]) - float(centres[labels[i], c])) ** 2 for c in range(3))) for i in known
    ) / len(known)
    assert math.isclose(float(got), expected, rel_tol=1e-6)
    got.backward()
    assert torch.equal(batch.grad[1], torch.zeros(3)) and batch.grad[0].abs().sum() > 0
    # no class has a centre yet: 0, finite, still differentiable
    empty = global_consistency(batch, centres, torch.zeros(5, dtype=torch.long), labels)
    assert float(empty) == 0.0 and empty.requires_grad


def test_update_centres_by_hand_over_several_steps():
    torch.manual_seed(5)
    centres, counts = torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)
    mine = [[0.0, 0.0] for _ in range(4)]
    my_counts = [0] * 4
    for step in range(4):
        labels = torch.tensor([[0, 2, 2], [1, 0, 3], [2, 2, 2], [0, 1, 0]][step])
        batch = torch.randn(3, 2)
        update_centres(centres, counts, batch, labels, rate=0.3)
        for k in set(labels.tolist()):
            rows = [i for i in range(3) if int(labels[i]) == k]
            mean = [sum(float(batch[i, c]) for i in rows) / len(rows) for c in range(2)]
            eta = math.exp(-0.3 * my_counts[k])
            mine[k] = [(1 - eta) * mine[k][c] + eta * mean[c] for c in range(2)]
            my_counts[k] += 1
        assert counts.tolist() == my_counts
        for k in range(4):
            for c in range(2):
                assert math.isclose(float(centres[k, c]), mine[k][c], rel_tol=1e-5, abs_tol=1e-6)


def _peaked_batch():
    """Features whose class-k map (CAMHead without conv, identity classifier) peaks at one position."""
    torch.manual_seed(6)
    labels = torch.tensor([1, 1, 0, 0])
    features = torch.rand(4, 3, 4, 4) * 0.1
    peaks = [(0, 1), (3, 2), (2, 2), (1, 0)]
    for b, (row, col) in enumerate(peaks):
        features[b, labels[b], row, col] = 5.0
    head = CAMHead(3, num_classes=3)
    with torch.no_grad():
        head.classifier.weight.copy_(torch.eye(3))
        head.classifier.bias.zero_()
    return head, features, labels, peaks


def test_head_by_hand_seeds_at_the_peak_and_updates_centres():
    inner, features, labels, peaks = _peaked_batch()
    head = I2CHead(inner, num_seeds=2, centre_rate=0.002)
    with torch.no_grad():
        head.centres[0] = torch.tensor([1.0, 2.0, 3.0])
        head.counts[0] = 4
    before = head.centres.clone()
    out = head(features, labels)
    vectors = [[float(features[b, c, row, col]) for c in range(3)] for b, (row, col) in enumerate(peaks)]
    scc = sum(math.dist(vectors[2 * i], vectors[2 * i + 1]) for i in range(2)) / 2
    assert math.isclose(float(out.stochastic), scc, rel_tol=1e-6)
    centre_of = [[(vectors[2 * i][c] + vectors[2 * i + 1][c]) / 2 for c in range(3)] for i in range(2)]
    # class 1 had no centre, class 0 had one: only pair 1 (class 0) counts
    assert math.isclose(float(out.global_), math.dist(centre_of[1], before[0].tolist()), rel_tol=1e-6)
    eta = math.exp(-0.002 * 4)
    for c in range(3):
        assert math.isclose(float(head.centres[0, c]), (1 - eta) * float(before[0, c]) + eta * centre_of[1][c],
                            rel_tol=1e-6)  # fmt: skip
        assert math.isclose(float(head.centres[1, c]), centre_of[0][c], rel_tol=1e-6)
    assert head.counts.tolist() == [5, 1, 0]
    torch.testing.assert_close(out.logits, inner(features))


def test_head_without_labels_or_in_eval_is_the_wrapped_head():
    inner, features, labels, _ = _peaked_batch()
    head = I2CHead(inner)
    torch.testing.assert_close(head(features), inner(features))
    a, b = head.forward_with_maps(features, classes=labels), inner.forward_with_maps(features, classes=labels)
    torch.testing.assert_close(a.maps, b.maps)
    head.eval()
    head(features, labels)
    assert head.counts.sum() == 0  # no update outside training


@pytest.mark.parametrize(
    ("labels", "error", "message"),
    [(torch.tensor([0, 1, 1, 1]), ValueError, "must share their label"),
     (torch.tensor([0, 0, 1]), ValueError, r"must have shape \(4,\)"),
     (torch.tensor([0.0, 0.0, 1.0, 1.0]), TypeError, "integer tensor"),
     (torch.tensor([0, 0, 3, 3]), ValueError, r"must lie in \[0, 3\)")],
)  # fmt: skip
def test_head_rejects_batches_that_are_not_pairs(labels, error, message):
    inner, features, _, _ = _peaked_batch()
    with pytest.raises(error, match=message):
        I2CHead(inner)(features, labels)


def test_odd_batches_and_bad_seed_options_are_refused():
    with pytest.raises(ValueError, match="an even B > 0"):
        stochastic_consistency(torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\)"):
        object_seeds(torch.rand(1, 2, 2), threshold=1.0)
    with pytest.raises(ValueError, match="num_seeds must be an int >= 1"):
        object_seeds(torch.rand(1, 2, 2), num_seeds=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"scc_weight": -1}, "scc_weight must be >= 0"),
     ({"num_seeds": 0}, "num_seeds must be >= 1"),
     ({"seed_threshold": 1.5}, r"seed_threshold must be in \[0, 1\)"),
     ({"min_seed_pixels": -2}, "min_seed_pixels must be >= 0"),
     ({"centre_rate": -0.1}, "centre_rate must be >= 0"),
     ({"seeds": 3}, "has no option 'seeds'")],
)  # fmt: skip
def test_bad_options_are_named(options, message):
    with pytest.raises(MethodError, match=message):
        get_method("i2c", options)


def test_defaults_are_the_authors():
    assert I2C().options == {"scc_weight": 0.008, "gcc_weight": 0.001, "num_seeds": 3, "seed_threshold": 0.7,
                             "min_seed_pixels": 30, "centre_rate": 0.002}  # fmt: skip


def test_method_loss_is_ce_plus_weighted_terms():
    torch.manual_seed(7)
    method = I2C(scc_weight=0.5, gcc_weight=0.25)
    model = method.build(small_cam(3, 8, widths=(4, 8)), None)
    assert isinstance(model, Network) and isinstance(model.head, I2CHead)
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([2, 2, 0, 0])
    with torch.no_grad():
        model.head.counts[:] = 1  # every class has a centre: both terms non-zero
    out = method.loss(model, images, {"label": labels, "image": images}, Step(0, 1))
    logits = out.logits.detach()
    ce = -sum(float(torch.log_softmax(logits[b], 0)[labels[b]]) for b in range(4)) / 4
    assert math.isclose(float(out.parts["cls"]), ce, rel_tol=1e-5)
    assert float(out.parts["scc"]) > 0 and float(out.parts["gcc"]) > 0
    expected = ce + 0.5 * float(out.parts["scc"]) + 0.25 * float(out.parts["gcc"])
    assert math.isclose(float(out.loss), expected, rel_tol=1e-5)
    with pytest.raises(MethodError, match="multi-label"):
        method.loss(model, images, {"label": labels, "labels": torch.ones(4, 3)}, Step(0, 1))
    with pytest.raises(MethodError, match="--dataset voc is multi-label"):
        method.build(small_cam(3, 8, widths=(4, 8)), SimpleNamespace(dataset="voc"))


# ---------------------------------------------------------------- the sampler


def _labels(counts):
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(9)).tolist()
    return [labels[i] for i in order]


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_sampler_batches_are_distinct_class_pairs_without_duplicates(replicas):
    labels = _labels([6] * 8)  # 8 classes, 24 pairs
    samplers = [PairSampler(labels, 8, seed=3, num_replicas=replicas, rank=r) for r in range(replicas)]
    seen: list[int] = []
    for sampler in samplers:
        sampler.set_epoch(2)
        indices = list(sampler)
        assert len(indices) == len(sampler) == len(samplers[0])
        for start in range(0, len(indices), 8):
            batch = indices[start : start + 8]
            pairs = [(labels[batch[2 * i]], labels[batch[2 * i + 1]]) for i in range(4)]
            assert all(a == b for a, b in pairs)
            assert len({a for a, _ in pairs}) == 4  # distinct classes
        seen.extend(indices)
    assert len(seen) == len(set(seen))
    assert len(seen) == (24 // 4 // replicas) * replicas * 8


@pytest.mark.parametrize("replicas", [2, 3])
def test_sampler_processes_together_draw_one_processs_batches(replicas):
    # under torchrun the processes' shares of each step are the batch one process with the
    # global batch size draws, in rank order, whole pairs each
    labels = _labels([7, 6, 9, 4, 5])
    one = PairSampler(labels, 4 * replicas, seed=5)
    shards = [PairSampler(labels, 4, seed=5, num_replicas=replicas, rank=r) for r in range(replicas)]
    for sampler in (one, *shards):
        sampler.set_epoch(1)
    mine = [list(sampler) for sampler in shards]
    assert all(len(indices) == len(mine[0]) for indices in mine)
    steps = range(len(mine[0]) // 4)
    together = [index for step in steps for indices in mine for index in indices[4 * step : 4 * step + 4]]
    assert together == list(one)


def test_object_seed_keys_of_a_process_are_its_rows_of_the_global_draw(monkeypatch):
    from spn.methods import i2c

    monkeypatch.setattr(i2c, "process_count", lambda: 3)
    monkeypatch.setattr(i2c, "process_rank", lambda: 1)
    torch.manual_seed(4)
    keys = i2c._shard_keys(2, 5, torch.device("cpu"))
    torch.manual_seed(4)
    torch.testing.assert_close(keys, torch.rand(6, 5)[2:4], rtol=0, atol=0)
    maps = torch.rand(2, 1, 5)
    with pytest.raises(ValueError, match=r"keys must have shape \(2, 5\)"):
        object_seeds(maps, keys=torch.rand(2, 4))


def test_sampler_is_deterministic_per_seed_and_epoch():
    labels = _labels([5, 7, 4, 6])
    a, b = PairSampler(labels, 4, seed=1), PairSampler(labels, 4, seed=1)
    for epoch in (0, 3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert list(a) == list(b)
    a.set_epoch(0)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(PairSampler(labels, 4, seed=2)) != first


def test_sampler_with_more_pairs_per_batch_than_classes_repeats_classes():
    labels = _labels([9, 3, 1])  # odd and singleton classes: 4 + 1 + 0 pairs
    sampler = PairSampler(labels, 6)
    indices = list(sampler)
    assert len(indices) == len(sampler) == 6  # one batch of 3 pairs out of 5
    assert len(set(indices)) == 6
    assert all(labels[indices[2 * i]] == labels[indices[2 * i + 1]] for i in range(3))
    assert {labels[indices[2 * i]] for i in range(3)} == {0, 1}  # both classes with pairs


def test_sampler_errors():
    with pytest.raises(ValueError, match="even int >= 2"):
        PairSampler([0, 0], 3)
    with pytest.raises(ValueError, match="no class has two images"):
        PairSampler([0, 1, 2], 2)
    with pytest.raises(ValueError, match="rank"):
        PairSampler([0, 0], 2, num_replicas=2, rank=2)
    with pytest.raises(MethodError, match="must be even"):
        I2C().sampler([0, 0], seed=0, num_replicas=1, rank=0, batch_size=5)


# ---------------------------------------------------------------- the harness


def test_trains_evaluates_and_resumes(digits, tmp_path):
    lines, state = round_trip(digits, tmp_path, "i2c")
    assert [line["images"] for line in lines] == [40, 40]  # 20 pairs, 5 batches of 4 pairs
    assert {"loss_cls", "loss_scc", "loss_gcc"} <= set(lines[-1])
    assert all(math.isfinite(line["loss"]) for line in lines)
    assert state["head.counts"].sum() > 0 and state["head.centres"].abs().sum() > 0


def test_two_processes_under_torchrun_equal_one_process(digits, tmp_path):
    # the pairs of each global batch split between the processes, each process's object seeds
    # its rows of the global draw, the centres' update all-reduced, DDP's averaged gradients;
    # GroupNorm, as BatchNorm would couple the halves of the batch (tests/test_harness.py)
    options = ("--norm", "group")
    single = tmp_path / "single"
    assert train_method(digits, single, 2, "i2c", *options) == 0
    double = tmp_path / "double"
    finished = torchrun(
        "-m", "spn", "train", "--dataset", "digits", "--data", str(digits), "--model", "small_cam", "--method", "i2c",
        "--epochs", "2", "--batch-size", "8", "--lr", "0.05", "--widths", "8", "16", "--out", str(double), *options,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    one, two = load_checkpoint(single / "checkpoint.pt")["model"], load_checkpoint(double / "checkpoint.pt")["model"]
    assert one["head.counts"].sum() > 0
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
