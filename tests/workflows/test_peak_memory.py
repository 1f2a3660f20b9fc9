"""PeakRSS: the peak resident-set growth a method's report carries (``peak_mem_bytes``)."""

import time

import pytest

from slugkit.workflows import compare_support
from slugkit.workflows.compare_support import PeakRSS

MB = 1024 * 1024


def _spike(n_mb: int, hold_s: float = 0.05) -> None:
    """Touch ``n_mb`` MiB (every page resident), hold it, free it."""
    buf = bytearray(n_mb * MB)
    buf[::4096] = b"\x01" * len(buf[::4096])
    time.sleep(hold_s)
    del buf


@pytest.mark.parametrize("method", ["auto", "sampled"])
def test_peak_catches_a_freed_spike(method):
    with PeakRSS(method=method) as pm:
        _spike(120)
    assert pm.mode in ("hwm", "sampled")
    assert 100 * MB <= pm.bytes <= 400 * MB, pm.bytes
    with PeakRSS(method=method) as quiet:  # a second window does not inherit the first one's peak
        time.sleep(0.02)
    assert quiet.bytes < 60 * MB, quiet.bytes


def test_kernel_mark_used_where_it_resets(monkeypatch):
    if not compare_support._reset_hwm():
        pytest.skip("this kernel does not let a process reset its peak-RSS mark (/proc/self/clear_refs)")
    with PeakRSS() as pm:
        pass
    assert pm.mode == "hwm" and pm._thread is None  # no sampling thread: nothing slows the measured code
    monkeypatch.setattr(compare_support, "_reset_hwm", lambda: False)
    with PeakRSS() as pm:
        _spike(80)
    assert pm.mode == "sampled" and pm.bytes >= 60 * MB


def test_unknown_method_refused():
    with pytest.raises(ValueError, match="auto' or 'sampled"):
        PeakRSS(method="exact")
    with pytest.raises(TypeError):  # the method is keyword-only: PeakRSS("sampled") is not an interval
        PeakRSS(0.005, "sampled")


def test_nested_window_keeps_the_outer_peak_and_instances_can_be_reused():
    outer = PeakRSS()
    with outer:
        _spike(150)
        with PeakRSS() as inner:  # must not reset the kernel mark the outer window reads
            _spike(40)
    assert outer.bytes >= 130 * MB, outer.bytes
    assert inner.mode == "sampled" and 25 * MB <= inner.bytes < 130 * MB, inner.bytes
    for method in ("auto", "sampled"):
        pm = PeakRSS(method=method)
        for _ in range(2):  # the second window measures again (the sampling thread restarts)
            with pm:
                _spike(80)
            assert pm.bytes >= 60 * MB, (method, pm.bytes)


@pytest.mark.parametrize("interval", [0, -1, "x", True])
def test_bad_interval_refused(interval):
    with pytest.raises(ValueError, match="interval must be a number of seconds > 0"):
        PeakRSS(interval)
