"""The protocol driver (common.main) on a toy script: command line from Config, QUICK, bounds, provenance,
strict JSON, checked replots, and the all-or-nothing publisher under failures and signals."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import common
import protocol_toy as toy

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": f"{REPO / 'code'}{os.pathsep}{REPO / 'tests'}"}


def run(capsys, *argv):
    capsys.readouterr()
    code = common.main(toy, list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def snapshot(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_help_comes_from_config_comments_with_uniform_defaults(capsys):
    with pytest.raises(SystemExit):
        common.build_parser(toy).parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "steps of the toy loop (default: 50)" in text
    assert "--iters" in text and "--num-iters" not in text
    assert "test hooks: nan = a non-finite summary, sleep = slow steps (default: plain)" in text
    assert "(default: 3,4)" in text
    assert "--data-dir" not in text and "--jobs" not in text  # DATA is None, PARALLEL is not set


def test_comment_continuation_lines_join_the_help():
    assert common.field_comments(toy.Config)["mode"].endswith("sleep = slow steps")


def test_defaults_then_quick_then_flags(tmp_path, capsys):
    assert run(capsys, "--quick", "--out-dir", str(tmp_path))[0] == 0
    summary = json.loads((tmp_path / "results" / "protocol_toy.json").read_text())
    assert summary["config"]["num_iters"] == 5
    assert run(capsys, "--quick", "--iters", "7", "--out-dir", str(tmp_path))[0] == 0
    summary = json.loads((tmp_path / "results" / "protocol_toy.json").read_text())
    assert summary["config"]["num_iters"] == 7 and summary["config"]["sizes"] == [3, 4]


@pytest.mark.parametrize("argv", [["--iters", "0"], ["--iters", "x"], ["--step-size", "0"], ["--step-size", "nan"],
                                  ["--mode", "other"], ["--seed", str(2**32)], ["--seed", "-1"], ["--sizes", "3,0"],
                                  ["--no-such-flag"]])
def test_bad_settings_are_one_line_usage_errors(tmp_path, capsys, argv):
    code, out, err = run(capsys, *argv, "--out-dir", str(tmp_path))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "results").exists()


def test_results_carry_provenance_and_the_config(tmp_path, capsys):
    assert run(capsys, "--out-dir", str(tmp_path))[0] == 0
    summary = json.loads((tmp_path / "results" / "protocol_toy.json").read_text())
    prov = summary["provenance"]
    for key in ("git_commit", "git_dirty", "command", "started_utc", "wall_seconds", "cpu_seconds", "versions",
                "blas", "cpu_model", "cpu_count"):
        assert key in prov, key
    assert set(prov["versions"]) >= {"python", "numpy", "scipy", "autograd", "scikit-learn", "matplotlib"}
    assert all(lib["threads"] == 1 for lib in prov["blas"])  # taken while run() held one BLAS thread
    assert summary["experiment"] == "protocol_toy" and summary["config"]["seed"] == 7
    assert summary["arrays"]["grid"] == {"shape": [3, 4], "dtype": "float64"}


def test_same_seed_same_numbers(tmp_path, capsys):
    for sub in ("a", "b"):
        assert run(capsys, "--seed", "3", "--out-dir", str(tmp_path / sub))[0] == 0
    a, b = (json.loads((tmp_path / s / "results" / "protocol_toy.json").read_text()) for s in "ab")
    assert a["final"] == b["final"]


def test_non_finite_summary_never_overwrites_results(tmp_path, capsys):
    assert run(capsys, "--out-dir", str(tmp_path))[0] == 0
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "--mode", "nan", "--out-dir", str(tmp_path))
    assert code == 1 and "non-finite value at summary['final']" in err
    assert snapshot(tmp_path) == before


def test_failed_write_keeps_the_previous_complete_set(tmp_path, capsys):
    assert run(capsys, "--out-dir", str(tmp_path))[0] == 0
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "--mode", "fail_plot", "--iters", "9", "--out-dir", str(tmp_path))
    assert code == 1 and err.count("\n") == 1 and "No space left" in err
    assert snapshot(tmp_path) == before  # no staging folder, no .part- file, nothing new


def test_injected_failure_at_every_file_write(tmp_path, capsys, monkeypatch):
    """A failure while staging any one of the four files leaves the old set (byte for byte)."""
    assert run(capsys, "--out-dir", str(tmp_path))[0] == 0
    before = snapshot(tmp_path)
    real = common.verify_output
    for victim in ("protocol_toy.pdf", "protocol_toy.png", "protocol_toy.npz", "protocol_toy.json"):
        def failing(path, victim=victim):
            if path.name == victim:
                raise OSError(28, "No space left on device", str(path))
            return real(path)
        monkeypatch.setattr(common, "verify_output", failing)
        assert run(capsys, "--iters", "11", "--out-dir", str(tmp_path))[0] == 1
        assert snapshot(tmp_path) == before, victim
    monkeypatch.setattr(common, "verify_output", real)


def test_replot_redraws_from_saved_results(tmp_path, capsys):
    assert run(capsys, "--out-dir", str(tmp_path))[0] == 0
    results = snapshot(tmp_path / "results")
    (tmp_path / "protocol_toy.png").unlink()
    code, out, _ = run(capsys, "--replot", "--out-dir", str(tmp_path))
    assert code == 0 and (tmp_path / "protocol_toy.png").exists() and "wrote" in out
    assert snapshot(tmp_path / "results") == results


def _corrupt(tmp_path, how):
    json_path, npz_path = tmp_path / "results" / "protocol_toy.json", tmp_path / "results" / "protocol_toy.npz"
    summary = json.loads(json_path.read_text())
    if how == "other_experiment":
        summary["experiment"] = "hypernets_global_small"
    elif how == "other_version":
        summary["config"]["extra"] = 1
    elif how == "infinity":
        json_path.write_text(json_path.read_text().replace('"final": ', '"final": Infinity, "x": '))
        return
    elif how == "deep":
        json_path.write_text("[" * 100000 + "]" * 100000)
        return
    elif how == "huge_number":
        json_path.write_text('{"experiment": ' + "9" * 10000 + "}")
        return
    elif how == "not_json":
        json_path.write_bytes(b"\x00\xff garbage")
        return
    elif how in ("wrong_shape", "nan_array", "missing_array"):
        arrays = dict(np.load(npz_path))
        if how == "wrong_shape":
            arrays["grid"] = np.zeros((2, 2))
        elif how == "nan_array":
            arrays["trace"][0] = np.nan
        else:
            del arrays["grid"]
        np.savez(npz_path, **arrays)
    elif how == "truncated_npz":
        npz_path.write_bytes(npz_path.read_bytes()[:50])
    elif how == "missing":
        npz_path.unlink()
    elif how == "wrong_type":
        summary["trace_note"] = None
        summary["final"] = "a string"  # plot does not read it; manifest and config still fit
    json_path.write_text(json.dumps(summary))


@pytest.mark.parametrize("how", ["other_experiment", "other_version", "infinity", "deep", "huge_number", "not_json",
                                 "wrong_shape", "nan_array", "missing_array", "truncated_npz", "missing"])
def test_replot_of_bad_results_is_one_line_and_writes_nothing(tmp_path, capsys, how):
    assert run(capsys, "--out-dir", str(tmp_path))[0] == 0
    _corrupt(tmp_path, how)
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "--replot", "--out-dir", str(tmp_path))
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, (how, err)
    assert snapshot(tmp_path) == before


def test_check_divergence():
    common.check_divergence(5.0, 1.0, 3)
    with pytest.raises(common.DivergenceError, match="grew from"):
        common.check_divergence(2e3, 1.0, 3)
    with pytest.raises(common.DivergenceError, match="not finite"):
        common.check_divergence(np.array([1.0, np.inf]), 1.0, 3)


def _start(tmp_path, *argv):
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "protocol_toy.py"), "--out-dir", str(tmp_path),
                             *argv], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_at_random_moments_keep_the_previous_set(tmp_path, sig, code):
    """SIGTERM/SIGINT anywhere in a run: exit 143/130 with one line, and the previous set stays whole."""
    assert _start(tmp_path).wait(timeout=120) == 0
    before = snapshot(tmp_path)
    rs = np.random.RandomState(0)
    for delay in rs.uniform(0.3, 2.5, size=4):
        proc = _start(tmp_path, "--mode", "sleep", "--iters", "60")
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        after = snapshot(tmp_path)
        if proc.returncode == 0:       # it finished first: a complete new set
            before = after
            continue
        assert proc.returncode == code and err.strip().count("\n") == 0 and err.startswith("error: "), err
        assert after == before


def test_sigkill_debris_is_cleaned_by_the_next_run(tmp_path):
    assert _start(tmp_path).wait(timeout=120) == 0
    proc = _start(tmp_path, "--mode", "sleep", "--iters", "100")
    time.sleep(1.0)
    proc.kill()
    proc.wait()
    stale = tmp_path / f"{common.STAGING_PREFIX}999999999-x"  # what a killed run's staging folder looks like
    stale.mkdir()
    assert _start(tmp_path).wait(timeout=120) == 0
    assert not any(p.name.startswith(common.STAGING_PREFIX) for p in tmp_path.iterdir())


def test_git_dirty_counts_code_changes_not_the_outputs_runs_write(tmp_path, monkeypatch):
    """One script of make reproduce rewrites paper/ files; that must not mark the next one's code as dirty."""
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)
    git("init", "-q")
    for rel in ("code/x.py", "paper/results/x.json", "cache/gt.npz"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("0")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(common, "REPO", tmp_path)
    dirty = lambda: common.provenance(["x"], "now", 0.0, 0.0, [])["git_dirty"]  # noqa: E731
    assert dirty() is False
    (tmp_path / "paper" / "results" / "x.json").write_text("1")
    (tmp_path / "cache" / "gt.npz").write_text("1")
    assert dirty() is False
    (tmp_path / "code" / "x.py").write_text("1")
    assert dirty() is True


def test_provenance_cpu_counts_reaped_children():
    """Per-method processes and forked workers do the work: their CPU must be on the provenance clock."""
    before = common.tree_cpu_seconds()
    pid = os.fork()
    if pid == 0:  # the child: burn about 0.3 s of CPU, then leave without cleanup handlers
        end = time.process_time() + 0.3
        while time.process_time() < end:
            pass
        os._exit(0)
    os.waitpid(pid, 0)
    assert common.tree_cpu_seconds() - before >= 0.25
