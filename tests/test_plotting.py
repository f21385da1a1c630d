"""Figure saving (valid PDF/PNG, atomic, panels), paper style without font warnings, and common.py helpers."""
import argparse
import dataclasses
import logging
import struct
import warnings

import numpy as np
import pytest

import common
import plotting
from conftest import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def two_panel_figure():
    fig, axes = plotting.plt.subplots(1, 2, figsize=(8, 3))
    for ax in axes:
        ax.plot([0, 1, 2], [1, 0, 1], "r-")
        ax.set_xlabel(r"Hyperparameter $\lambda$")
    return fig, axes


def test_backend_is_headless():
    assert plotting.matplotlib.get_backend().lower() == "agg"


def test_paper_dir_is_beside_the_code():
    assert plotting.PAPER_DIR == REPO / "paper"


def test_save_figure_writes_valid_pdf_and_png(tmp_path):
    fig, _ = two_panel_figure()
    out = tmp_path / "new" / "folder"
    paths = plotting.save_figure(fig, "demo", out)
    plotting.close(fig)
    assert paths == [out / "demo.pdf", out / "demo.png"]
    assert (out / "demo.pdf").read_bytes()[:5] == b"%PDF-"
    assert (out / "demo.pdf").read_bytes().rstrip().endswith(b"%%EOF")
    assert png_size(out / "demo.png") == (800, 300)  # savefig.dpi 100
    assert sorted(p.name for p in out.iterdir()) == ["demo.pdf", "demo.png"]  # no temporary files left


def test_save_figure_replaces_existing_files_and_cleans_up_on_failure(tmp_path):
    fig, _ = two_panel_figure()
    (tmp_path / "demo.png").write_bytes(b"old")
    plotting.save_figure(fig, "demo", tmp_path, formats=("png",))
    assert (tmp_path / "demo.png").read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError):
        plotting.save_figure(fig, "demo", tmp_path, formats=("not-a-format",))
    plotting.close(fig)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.png"]


def test_save_panel_is_smaller_than_the_figure(tmp_path):
    fig, axes = two_panel_figure()
    whole = plotting.save_figure(fig, "whole", tmp_path, formats=("png",))[0]
    panel = plotting.save_panel(fig, axes[1], "panel", tmp_path)
    plotting.close(fig)
    assert [p.suffix for p in panel] == [".pdf", ".png"]
    assert panel[0].read_bytes()[:5] == b"%PDF-"
    (pw, ph), (fw, fh) = png_size(panel[1]), png_size(whole)
    assert pw < 0.75 * fw and pw * ph < 0.75 * fw * fh  # (the padding may add a margin above and below)
    assert len(list(tmp_path.iterdir())) == 3


def test_paper_style_uses_stix_without_font_warnings(tmp_path, caplog):
    from matplotlib import font_manager

    plotting.set_paper_style(font_size=17)
    assert plotting.plt.rcParams["font.size"] == 17
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG, "matplotlib.font_manager"):
        warnings.simplefilter("always")
        font = font_manager.findfont(font_manager.FontProperties(family="serif"), fallback_to_default=False)
        fig, _ = two_panel_figure()
        fig.suptitle(r"Validation Loss $\mathcal{L}_{\mathrm{Valid.}}$ $-1.5$")
        plotting.save_figure(fig, "styled", tmp_path)
        plotting.close(fig)
    assert "STIXGeneral" in font
    font_messages = [r.getMessage() for r in caplog.records
                     if r.levelno >= logging.WARNING or "not found" in r.getMessage()]
    assert font_messages == []
    assert [str(w.message) for w in caught if "font" in str(w.message).lower()] == []


def test_resolve_out_dir_creates_folders(tmp_path):
    assert plotting.resolve_out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()


# ------------------------------------------------------------------------------------------ common

@dataclasses.dataclass(frozen=True)
class DemoConfig:
    steps: int = 3
    rate: float = 1e-4


def test_results_round_trip(tmp_path):
    summary = {"config": DemoConfig(), "best": np.float64(1.5), "count": np.int64(3), "path": tmp_path,
               "list": (1, 2)}
    arrays = {"curve": np.linspace(0, 1, 5), "ints": np.arange(3)}
    json_path, npz_path = common.save_results(tmp_path, "demo", summary, arrays)
    assert json_path == tmp_path / "results" / "demo.json" and npz_path.exists()
    loaded, loaded_arrays = common.load_results(tmp_path, "demo")
    assert loaded == {"config": {"steps": 3, "rate": 1e-4}, "best": 1.5, "count": 3, "path": str(tmp_path),
                      "list": [1, 2]}
    assert set(loaded_arrays) == {"curve", "ints"}
    np.testing.assert_array_equal(loaded_arrays["curve"], arrays["curve"])
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["demo.json", "demo.npz"]


def test_load_results_missing(tmp_path):
    with pytest.raises(common.ExperimentError, match="no saved results.*demo.json"):
        common.load_results(tmp_path, "demo")


@pytest.mark.parametrize("damage", ["json", "npz-cut", "npz-garbage"])
def test_load_results_corrupt(tmp_path, damage):
    common.save_results(tmp_path, "demo", {"a": 1}, {"b": np.arange(100)})
    if damage == "json":
        (tmp_path / "results" / "demo.json").write_text("{not json")
    else:
        npz = tmp_path / "results" / "demo.npz"
        data = npz.read_bytes()
        npz.write_bytes(data[: len(data) // 2] if damage == "npz-cut" else b"garbage" * 10)
    with pytest.raises(common.ExperimentError, match="unreadable"):
        common.load_results(tmp_path, "demo")


def test_load_results_never_unpickles(tmp_path):
    common.save_results(tmp_path, "demo", {}, {"objects": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(common.ExperimentError, match="unreadable"):
        common.load_results(tmp_path, "demo")


def test_step_rng():
    a = common.step_rng(7, 3).randn(5)
    np.testing.assert_array_equal(a, common.step_rng(7, 3).randn(5))
    assert not np.allclose(a, common.step_rng(7, 4).randn(5))
    assert not np.allclose(a, common.step_rng(8, 3).randn(5))
    assert not np.allclose(a, common.step_rng(7, 3, 1).randn(5))


def test_check_finite():
    common.check_finite(np.array([1.0, 2.0]), 5)
    with pytest.raises(common.DivergenceError, match="objective is not finite at step 12"):
        common.check_finite(np.array([1.0, np.nan]), 12)
    with pytest.raises(common.DivergenceError, match="loss is not finite at step 0"):
        common.check_finite(np.inf, 0, "loss")


@pytest.mark.parametrize("text", ["0", "-3", "nan", "inf", "abc", "1.5", ""])
def test_positive_int_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        common.positive_int(text)


@pytest.mark.parametrize("text", ["0", "-1e-3", "nan", "NaN", "inf", "-inf", "abc", ""])
def test_positive_float_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        common.positive_float(text)


def test_argument_types_accept():
    assert common.positive_int("12") == 12
    assert common.positive_float("1e-4") == 1e-4
    assert common.nonnegative_int("0") == 0
    with pytest.raises(argparse.ArgumentTypeError):
        common.nonnegative_int("-1")


def test_experiment_parser_rejects_bad_values(capsys):
    parser = common.experiment_parser("demo", default_iters=100)
    args = parser.parse_args(["--iters", "5", "--seed", "0", "--quick"])
    assert (args.iters, args.seed, args.quick, args.synthetic) == (5, 0, True, False)
    assert parser.parse_args([]).seed == 7
    for bad in (["--iters", "0"], ["--iters", "nan"], ["--log-every", "-2"], ["--seed", "x"]):
        with pytest.raises(SystemExit) as err:
            parser.parse_args(bad)
        assert err.value.code == 2
    assert "--synthetic" not in parser.format_help()


def test_run_main_reports_one_line(capsys):
    def failing(argv):
        raise common.DivergenceError("objective is not finite at step 3")
    assert common.run_main(failing, []) == 1
    assert capsys.readouterr().err == "error: objective is not finite at step 3\n"
    assert common.run_main(lambda argv: 0, []) == 0
