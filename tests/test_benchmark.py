"""benchmark.py on tiny sizes: every row is produced with the documented keys, the bound arithmetic, the CLI
(--json, --only) and the table; no timing assertions (the machine is shared)."""
import json
import math

import pytest

import benchmark as bm

KEYS = {"name", "reference_seconds", "seconds", "speedup", "bound_seconds", "fraction_of_bound"}


def test_tiny_run_writes_every_row(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bm.main(["--tiny", "--synthetic", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert [r["name"] for r in rows] == list(bm.NAMES)
    for r in rows:
        assert set(r) == KEYS
        assert all(r[k] > 0 and math.isfinite(r[k]) for k in KEYS - {"name"})
        assert r["speedup"] == pytest.approx(r["reference_seconds"] / r["seconds"])
        assert r["fraction_of_bound"] == pytest.approx(r["bound_seconds"] / r["seconds"])
    out = capsys.readouterr().out
    assert "GFLOP/s" in out and "speed-up" in out and all(name in out for name in bm.NAMES)


def test_only_selects_rows(tmp_path):
    path = tmp_path / "bench.json"
    assert bm.main(["--tiny", "--synthetic", "--only", "local_step", "unrolled_hypergradient",
                    "--json", str(path)]) == 0
    assert [r["name"] for r in json.loads(path.read_text())] == ["unrolled_hypergradient", "local_step"]


def test_bound_is_the_slower_resource_per_phase():
    phases = [(2e9, 1e6), (0, 4e9), (1e9, 1e9)]   # compute-bound, memory-bound, balanced
    assert bm.bound_seconds(phases, flops_rate=1e9, bytes_rate=2e9) == pytest.approx(2 + 2 + 1)


def test_flop_models():
    flops, _ = bm.mlp_phase((784, 10), 2, 100)
    assert flops == 2 * 4 * 100 * 784 * 10            # z and dW, no delta for the first layer
    flops, _ = bm.mlp_phase((784, 100, 10), 1, 100)
    assert flops == 4 * 100 * 784 * 100 + 6 * 100 * 100 * 10
    phases = bm.unrolled_phases(200, 100, 784, 10)
    assert len(phases) == 401 and sum(f for f, _ in phases) == 1600 * 100 * 7840 + 2 * 785 ** 2 * 10


def test_table_marks_missed_targets():
    row = {"name": "large_step", "reference_seconds": 1.0, "seconds": 0.5, "speedup": 2.0, "bound_seconds": 0.4,
           "fraction_of_bound": 0.8}
    assert "target missed" in bm.table([row])
    assert "target missed" not in bm.table([dict(row, seconds=0.25, speedup=4.0, fraction_of_bound=1.6)])
