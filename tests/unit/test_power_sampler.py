"""Energy comes from NVML's total-energy counter where the board has one (exact for short runs),
from the sampled power otherwise. NVML is faked: this machine has no GPU."""

import sys
import time
import types

import pytest

from bench.measure import PowerSampler


def fake_nvml(energy_mj=None, watts=200.0):
    m = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: "gpu0",
        nvmlDeviceGetPowerUsage=lambda h: int(watts * 1000),
    )
    if energy_mj is not None:
        m.nvmlDeviceGetTotalEnergyConsumption = lambda h: next(energy_mj)
    else:

        def unsupported(h):
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

        m.nvmlDeviceGetTotalEnergyConsumption = unsupported
    return m


def test_energy_counter_gives_joules_and_mean_power(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(iter([1_000_000, 1_030_000])))
    with PowerSampler(period_s=0.01) as p:
        time.sleep(0.1)
    assert p.joules() == pytest.approx(30.0)
    assert 30.0 / 5.0 < p.mean_watts() <= 30.0 / 0.1  # 30 J over the run (>= 0.1 s), not the sampled 200 W


def test_sampled_power_is_the_fallback_without_a_counter(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(None, watts=150.0))
    with PowerSampler(period_s=0.01) as p:
        time.sleep(0.1)
    assert p.mean_watts() == pytest.approx(150.0)
    assert p.joules() == pytest.approx(150.0 * 0.1, rel=0.5)
