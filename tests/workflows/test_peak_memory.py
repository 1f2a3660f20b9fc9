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
