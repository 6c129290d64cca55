import atexit
import os
import shutil
import tempfile

from hypothesis import HealthCheck, settings

# torch.compile's on-disk caches (Inductor's and AOTAutograd's, /tmp/torchinductor_$USER by
# default) are keyed on the traced graph, which names a custom operator but not its schema:
# after a change to spn's operators a warm cache from an earlier checkout replays stale code.
# Each test session compiles into its own folder (unless one is set).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="spn-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

# "ci" keeps the whole CPU suite within minutes on 2 cores; "thorough" is for a long local run.
settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# Tiny digits benchmarks shared by the harness and method tests (generated once per session;
# tests read them and never write into them: a test that needs a broken copy copies it first).
import pytest  # noqa: E402

from spn.data.digits import DigitsBenchmark, write_benchmark  # noqa: E402

SMALL_DIGITS = DigitsBenchmark(
    image_size=48, train_per_class=4, val_per_class=2, test_per_class=2, digit_size=(14, 22), distractor_size=(8, 12)
)
MINI_DIGITS = DigitsBenchmark(
    image_size=32, train_per_class=2, val_per_class=1, test_per_class=1, digit_size=(12, 16), distractor_size=(6, 8)
)


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """48 px, 40 training images (4 a class)."""
    root = tmp_path_factory.mktemp("digits")
    write_benchmark(root, SMALL_DIGITS, seed=0)
    return root


@pytest.fixture(scope="session")
def mini_digits(tmp_path_factory):
    """32 px, 20 training images (2 a class)."""
    root = tmp_path_factory.mktemp("mini_digits")
    write_benchmark(root, MINI_DIGITS, seed=0)
    return root
