"""Hermetic dtype: every test sees a CPU without native bf16, so `--dtype auto` resolves to float32
whatever machine runs the suite (exact comparisons stay exact); the bf16 paths are tested explicitly."""
import pytest

import runtime


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_bf16_features", lambda cpuinfo=None: [])
