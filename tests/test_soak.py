"""The soak (issue 7): many random architectures with random masks through compress.

Skipped unless SRFX_SOAK=N is set; then draws N examples from every model family and checks
float64 equivalence, never-larger and an untouched input model, and writes the count of
examples and failures to bench/results/soak.json (see README, "Soak"). ``test_soak_streams``
draws N more from the property tests of the most intricate rewrites, each with its own
checks: LayerNorm/RMSNorm streams of a transformer and of a ConvNeXt (compensated norms and
their readers) and attention blocks losing heads and dims; bench/results/soak_streams.json.

    SRFX_SOAK=10000 python -m pytest tests/test_soak.py -q
"""
import json
import os
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisException, StopTest

import test_attention_heads
import test_compensate_ln
from strategies import any_model, fresh_input
from test_properties import _compress, _report, _state, assert_same_function

N = int(os.environ.get("SRFX_SOAK", "0"))
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "soak.json"


@pytest.mark.skipif(N == 0, reason="set SRFX_SOAK=N to run the soak")
def test_soak():
    stats = {"examples": 0, "failures": 0, "by_family": {}}

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

    _run_and_record(run, stats, RESULTS)


# the property tests' own bodies (hypothesis' documented ``inner_test``), drawing from ``data``
STREAM_PROPERTIES = {
    "transformer-stream": test_compensate_ln.test_transformer_stream_channels_leave_exactly,
    "convnext-stream": test_compensate_ln.test_convnext_stream_channels_leave_exactly,
    "attention": test_attention_heads.test_random_attention_blocks_stay_exact,
}


@pytest.mark.skipif(N == 0, reason="set SRFX_SOAK=N to run the soak")
def test_soak_streams():
    stats = {"examples": 0, "failures": 0, "by_family": {}}

    @settings(max_examples=N, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(family=st.sampled_from(sorted(STREAM_PROPERTIES)), data=st.data())
    def run(family, data):
        def count(failed: bool) -> None:
            stats["examples"] += 1
            stats["failures"] += failed
            stats["by_family"][family] = stats["by_family"].get(family, 0) + 1

        try:
            STREAM_PROPERTIES[family].hypothesis.inner_test(data=data)
        except (StopTest, HypothesisException):
            raise  # hypothesis' own signals (its data ran out mid-draw): not an example, not a failure
        except BaseException:
            count(True)
            raise
        count(False)

    _run_and_record(run, stats, RESULTS.with_name("soak_streams.json"))


def _run_and_record(run, stats: dict, path: Path) -> None:
    """Run the soak on one thread, write its counts to ``path`` however it ends, then fail if
    any example did."""
    torch.set_num_threads(1)
    start = time.time()
    try:
        run()
    finally:
        stats["seconds"] = round(time.time() - start, 1)
        stats["torch"] = torch.__version__
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stats, indent=2) + "\n")
    assert stats["failures"] == 0
