"""The soak (issue 7): many random architectures with random masks through compress.

Skipped unless SRFX_SOAK=N is set; then draws N examples from every model family and checks
float64 equivalence, never-larger and an untouched input model, and writes the count of
examples and failures to bench/results/soak.json (see README, "Soak").

    SRFX_SOAK=10000 python -m pytest tests/test_soak.py -q
"""
import json
import os
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from strategies import any_model, fresh_input
from test_properties import _compress, _report, _state, assert_same_function

N = int(os.environ.get("SRFX_SOAK", "0"))
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "soak.json"


@pytest.mark.skipif(N == 0, reason="set SRFX_SOAK=N to run the soak")
def test_soak():
    stats = {"examples": 0, "failures": 0, "by_family": {}}
    start = time.time()

    @settings(max_examples=N, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=any_model(spare=False))
    def run(case):
        stats["examples"] += 1
        stats["by_family"][case.family] = stats["by_family"].get(case.family, 0) + 1
        model = case.at(torch.float64)
        before = _state(model)
        try:
            result = _compress(model, fresh_input(case.input_shape, torch.float64, 0))
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
            r = _report(result)
            assert r.stored_after <= r.stored_before
            assert_same_function(model, result, case.input_shape, torch.float64, rtol=1e-10, atol=1e-12)
        except BaseException:
            stats["failures"] += 1
            raise

    torch.set_num_threads(1)
    try:
        run()
    finally:
        stats["seconds"] = round(time.time() - start, 1)
        stats["torch"] = torch.__version__
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(stats, indent=2) + "\n")
    assert stats["failures"] == 0
