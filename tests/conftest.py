"""Shared test configuration: ``tests/`` on sys.path, and hypothesis profiles.

Select with ``HYPOTHESIS_PROFILE=ci|dev|soak`` (default ``ci``):

* ``ci``   -- derandomized (same examples every run), 30 examples per property, no deadline
* ``dev``  -- 100 random examples per property (no deadline: one compress takes tens to
              hundreds of milliseconds, over hypothesis' 200 ms default on a loaded machine)
* ``soak`` -- 10000 random examples per property, for long bug hunts
"""
import os
import sys

from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile("ci", derandomize=True, max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("soak", max_examples=10000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
