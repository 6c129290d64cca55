import os

from hypothesis import HealthCheck, settings

# "ci" keeps the whole CPU suite within minutes on 2 cores; "thorough" is for a long local run.
settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
