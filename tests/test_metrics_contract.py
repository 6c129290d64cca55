"""The one contract of spn.metrics, checked for every metric: predictions first then ground
truth; compute() -> MetricResult with the headline in .value; one-shot functions return what
compute() does; merge / state_dict / sync add counts exactly (also across two real
torch.distributed processes); an update that raises changes nothing."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spn import metrics
from spn.metrics import (
    BoxAccuracy,
    CorLoc,
    LocalizationAccuracy,
    Metric,
    MetricResult,
    ObjectEnergy,
    PointingGame,
    PxAP,
)


def make_cases(seed: int = 0) -> dict[str, tuple]:
    """name -> (metric factory, one-shot function, options, list of batches (positional args))."""
    rng = np.random.default_rng(seed)

    def boxes(count, side=12):
        out = []
        for _ in range(count):
            x0, y0 = rng.integers(0, side // 2, size=2)
            out.append(np.array([[x0, y0, rng.integers(x0, side), rng.integers(y0, side)]]))
        return out

    def maps(count, side=12):
        return rng.random((count, side, side))

    sizes = [3, 2, 4, 1, 0, 2]  # includes an empty batch
    cases = {
        "box_accuracy_v2": (BoxAccuracy, metrics.box_accuracy, {"interval": 0.05},
                            [(maps(n), boxes(n)) for n in sizes]),
        "box_accuracy_v1": (BoxAccuracy, metrics.box_accuracy, {"version": 1, "interval": 0.05},
                            [(maps(n), boxes(n)) for n in sizes]),
        "pxap": (PxAP, metrics.pxap, {"interval": 0.05},
                 [(maps(n), rng.random((n, 12, 12)) > 0.7) for n in sizes]),
        "localization_accuracy": (LocalizationAccuracy, metrics.localization_accuracy, {},
                                  [(boxes(n), boxes(n)) for n in sizes]),
        "corloc": (CorLoc, metrics.corloc, {},
                   [(boxes(n), boxes(n), rng.integers(0, 3, n)) for n in sizes]),
        "pointing_game": (PointingGame, metrics.pointing_game, {"num_classes": 4, "radius": 2},
                          [(rng.uniform(0, 12, (n, 2)), boxes(n), rng.integers(0, 3, n)) for n in sizes]),
        "object_energy": (ObjectEnergy, metrics.object_energy, {},
                          [(maps(n), boxes(n)) for n in sizes]),
    }
    return cases


CASES = make_cases()


def build(name):
    factory, _, options, _ = CASES[name]
    return factory(**options)


def concatenated(batches):
    """The batches as one batch (per-image lists and arrays joined)."""
    columns = list(zip(*batches, strict=True))
    joined = []
    for column in columns:
        if isinstance(column[0], np.ndarray) and column[0].ndim >= 1 and not isinstance(column[0][0:0], list):
            try:
                joined.append(np.concatenate(column))
                continue
            except ValueError:
                pass
        joined.append([item for part in column for item in part])
    return joined


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_shot_returns_what_compute_returns(name):
    _, one_shot, options, batches = CASES[name]
    metric = build(name)
    for batch in batches:
        metric.update(*batch)
    streamed = metric.compute()
    once = one_shot(*concatenated(batches), **options)
    assert isinstance(streamed, MetricResult) and isinstance(once, MetricResult)
    assert streamed == once
    assert 0.0 <= streamed.value <= 1.0
    assert streamed.count == sum(len(batch[0]) for batch in batches)
    json.dumps(streamed.to_dict())  # JSON-ready


@pytest.mark.parametrize("name", sorted(CASES))
def test_merge_of_split_batches_equals_one_metric(name):
    _, _, _, batches = CASES[name]
    whole, left, right = build(name), build(name), build(name)
    for index, batch in enumerate(batches):
        whole.update(*batch)
        (left if index < 3 else right).update(*batch)  # contiguous shards, as sync's rank order
    right_before = right.compute()
    assert left.merge(right) is left
    assert left.compute() == whole.compute()
    assert right.compute() == right_before  # the other one is unchanged


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_dict_round_trip_and_reset(name):
    _, _, _, batches = CASES[name]
    metric = build(name)
    for batch in batches:
        metric.update(*batch)
    copy = build(name)
    copy.load_state_dict(metric.state_dict())
    assert copy.compute() == metric.compute()
    metric.reset()
    with pytest.raises(ValueError, match="no images were evaluated"):
        metric.compute()


@pytest.mark.parametrize("name", sorted(CASES))
def test_empty_run_is_no_score(name):
    metric = build(name)
    with pytest.raises(ValueError, match="no images were evaluated"):
        metric.compute()


def test_merge_refuses_other_metrics_and_other_options():
    with pytest.raises(ValueError, match="different options"):
        BoxAccuracy(2).merge(BoxAccuracy(1))
    with pytest.raises(ValueError, match="cannot merge a CorLoc"):
        LocalizationAccuracy().merge(CorLoc())
    with pytest.raises(ValueError, match="different options"):
        PointingGame(num_classes=3).merge(PointingGame(num_classes=3, protocol="released"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_update_that_raises_changes_nothing(name):
    _, _, _, batches = CASES[name]
    metric = build(name)
    metric.update(*batches[0])
    before = metric.state_dict()
    bad = list(batches[2])
    bad[1] = list(bad[1])[:-1]  # one ground-truth entry short (masks or boxes)
    with pytest.raises((ValueError, TypeError)):
        metric.update(*bad)
    after = metric.state_dict()
    assert json.dumps(before, default=str) == json.dumps(after, default=str)


def test_result_names_are_the_headline_keys():
    names = {name: build(name).name for name in CASES}
    assert names == {
        "box_accuracy_v2": "max_box_acc_v2",
        "box_accuracy_v1": "max_box_acc",
        "pxap": "pxap",
        "localization_accuracy": "gt_known_loc",
        "corloc": "corloc",
        "pointing_game": "pointing_game",
        "object_energy": "object_energy",
    }


# ------------------------------------------------------------------- two real processes (gloo)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def distributed_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name in sorted(CASES):
            _, _, _, batches = CASES[name]
            metric = build(name)
            # uneven shards, each sample on one rank only: 4 batches on rank 0, 2 on rank 1
            for index, batch in enumerate(batches):
                if (index < 4) == (rank == 0):
                    metric.update(*batch)
            metric.sync()
            results[name] = metric.compute().to_dict()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(results, handle)
    finally:
        dist.destroy_process_group()


def test_sync_across_two_processes_equals_one_process(tmp_path):
    mp.start_processes(
        distributed_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    expected = {}
    for name in sorted(CASES):
        metric = build(name)
        for batch in CASES[name][3]:
            metric.update(*batch)
        expected[name] = json.loads(json.dumps(metric.compute().to_dict()))
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == expected, f"rank {rank}"


def test_sync_without_a_process_group_does_nothing():
    metric = build("corloc")
    metric.update(*CASES["corloc"][3][0])
    before = metric.compute()
    assert not dist.is_initialized()
    metric.sync()
    assert metric.compute() == before


def test_metric_base_is_abstract():
    with pytest.raises(TypeError):
        Metric()  # type: ignore[abstract]
    assert torch.__version__  # (torch.distributed is part of every torch build used here)
