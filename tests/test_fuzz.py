"""The fuzzing harness (tools/fuzz.py), briefly: inputs from strangers are refused cleanly, never crash,
hang or read outside their directory. `python tools/fuzz.py --minutes N` runs the same targets longer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import strategies as st

from moeport.tools.fuzz import TARGETS, Target, fuzz

EXAMPLES = 300  # per target: about 2 s each on a 2-core machine


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target_has_no_crash_hang_or_read_outside(name):
    report = fuzz(TARGETS[name], max_examples=EXAMPLES, seed=0, case_timeout=10)
    assert report.cases >= EXAMPLES // 2, report.summary()
    assert report.refused > 0, report.summary()
    assert not report.failed, report.summary()


def test_every_registered_target_is_one_of_ours_or_new():
    assert {"safetensors-header", "config-json", "stored-config", "shard-index", "manifest", "cli-flags"} <= set(
        TARGETS
    )


def test_the_harness_reports_crashes_hangs_and_reads_outside(tmp_path):
    """The harness itself can fail: a target that crashes, hangs and reads outside is reported."""
    secret = tmp_path / "secret.txt"
    secret.write_text("s")

    def run(case: int, directory: Path) -> None:
        (directory / "input").write_text("mine")  # writing and reading inside is fine
        (directory / "input").read_text()
        if case == 0:
            raise ValueError("a clean refusal")
        if case == 1:
            raise TypeError("a crash")
        if case == 2:
            time.sleep(5)
        if case == 3:
            secret.read_text()

    t = Target("self-test", st.sampled_from([0, 1, 2, 3, 4]), run, refusals=lambda: (ValueError,))
    report = fuzz(t, max_examples=40, seed=0, case_timeout=0.5)
    assert report.refused and report.accepted and report.crashes and report.hangs and report.reads_outside
    assert report.failed
    summary = report.summary()
    assert "TypeError: a crash" in summary and "test_fuzz.py" in summary
    assert f"opened {secret}" in summary
    assert "hang: ran 0.5 s, limit 0.5 s" in summary
