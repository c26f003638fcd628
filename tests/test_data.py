"""A device's data file: every problem is a DataError naming the file and the problem."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from broker.errors import DataError
from broker.task import ModelSpec, TrainSpec
from device_agent.data import load_dataset, open_data, shape_for
from device_agent.trainer import tensors_for

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def refused(path: Path, *fragments: str, label: str = "label") -> str:
    """Load ``path``; the DataError must name the file and contain every fragment."""
    with pytest.raises(DataError) as info:
        load_dataset(path, label)
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert re.search(fragment, message), f"{fragment!r} not in {message!r}"
    assert info.value.reason == "bad_data"
    return message


# -- happy paths --------------------------------------------------------------------------


def test_csv_happy_path(tmp_path):
    path = write(tmp_path / "d.csv", "x1, label ,x2\n1, 0, 2.5\n\n-3,1,4e-1\n   \n")
    ds = load_dataset(path, "label")
    assert ds.path == path and len(ds) == 2
    assert ds.X.dtype == np.float32 and ds.y.dtype == np.float64
    np.testing.assert_array_equal(ds.X, np.array([[1, 2.5], [-3, 0.4]], dtype=np.float32))
    np.testing.assert_array_equal(ds.y, [0.0, 1.0])


def test_csv_example_and_txt_extension(tmp_path):
    ds = load_dataset(ROOT / "examples" / "bob_and_alice" / "bob.csv")
    np.testing.assert_array_equal(ds.X, [[0, 0], [0, 1]])
    np.testing.assert_array_equal(ds.y, [0, 0])
    txt = write(tmp_path / "d.TXT", "a,label\n1,2\n")
    assert len(load_dataset(txt)) == 1


def test_the_label_column_is_chosen_per_task(tmp_path):
    data = open_data(write(tmp_path / "d.csv", "a,b,c\n1,2,3\n4,5,6\n"))
    assert data.columns == ("a", "b", "c")
    ds = data.dataset("b")
    np.testing.assert_array_equal(ds.X, [[1, 3], [4, 6]])
    np.testing.assert_array_equal(ds.y, [2, 5])


def test_npz_happy_path(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.integers(-5, 5, size=(6, 3, 8)).astype(np.int16)  # sensor windows: channels x time
    y = np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)
    np.savez(tmp_path / "w.npz", X=X, y=y, extra=np.zeros(2))
    ds = load_dataset(tmp_path / "w.npz", "ignored for npz")
    assert ds.X.shape == (6, 3, 8) and ds.X.dtype == np.float32
    np.testing.assert_array_equal(ds.X, X.astype(np.float32))
    np.testing.assert_array_equal(ds.y, y)


def test_compressed_npz(tmp_path):
    np.savez_compressed(tmp_path / "c.npz", X=np.ones((2, 2)), y=np.zeros(2))
    assert len(load_dataset(tmp_path / "c.npz")) == 2


# -- one test per problem -----------------------------------------------------------------


def test_missing_file(tmp_path):
    refused(tmp_path / "nope.csv", "not found")


def test_directory_instead_of_file(tmp_path):
    (tmp_path / "dir.csv").mkdir()
    refused(tmp_path / "dir.csv", "not a regular file")


def test_empty_file(tmp_path):
    refused(write(tmp_path / "e.csv", ""), "empty")


def test_blank_lines_only(tmp_path):
    refused(write(tmp_path / "b.csv", "\n  \n,,\n"), "empty")


def test_header_only(tmp_path):
    refused(write(tmp_path / "h.csv", "x1,x2,label\n"), "header only")


def test_no_label_column(tmp_path):
    path = write(tmp_path / "n.csv", "x1,x2,target\n1,2,3\n")
    refused(path, "no label column 'label'", r"\['x1', 'x2', 'target'\]")


def test_label_column_only(tmp_path):
    refused(write(tmp_path / "l.csv", "label\n1\n"), "no feature columns")


def test_non_numeric_cell_names_line_and_column(tmp_path):
    path = write(tmp_path / "c.csv", "x1,x2,label\n1,2,0\n3,abc,1\n")
    refused(path, "line 3", "column 'x2'", "'abc' is not a number")


def test_ragged_row(tmp_path):
    path = write(tmp_path / "r.csv", "x1,x2,label\n1,2,0\n3,1\n")
    refused(path, "line 3 has 2 fields, header has 3")


def test_not_utf8_text(tmp_path):
    path = tmp_path / "bin.csv"
    path.write_bytes(b"x,label\n\xff\xfe,1\n")
    refused(path, "not a text CSV")


def test_unsupported_extension(tmp_path):
    refused(write(tmp_path / "d.json", '{"X": [[1]]}'), "unsupported data file type '.json'")


def test_nan_in_csv(tmp_path):
    refused(write(tmp_path / "nan.csv", "x,label\n1,0\nnan,1\n"), "NaN or infinite")


def test_inf_label_in_csv(tmp_path):
    refused(write(tmp_path / "inf.csv", "x,label\n1,inf\n"), "NaN or infinite")


def test_nan_in_npz(tmp_path):
    np.savez(tmp_path / "nan.npz", X=np.ones((2, 2)), y=np.array([0.0, np.nan]))
    refused(tmp_path / "nan.npz", "NaN or infinite")


@pytest.mark.parametrize("present", [{"X"}, {"y"}, set()])
def test_npz_without_x_or_y(tmp_path, present):
    arrays = {"X": np.ones((2, 2)), "y": np.zeros(2), "Z": np.zeros(1)}
    np.savez(tmp_path / "m.npz", **{k: v for k, v in arrays.items() if k in present | {"Z"}})
    missing = sorted({"X", "y"} - present, key="Xy".index)
    refused(tmp_path / "m.npz", re.escape(f"lacks array(s) {missing}"), "needs X and y")


def test_npz_with_object_array_needs_pickle_and_is_refused(tmp_path):
    X = np.empty((2, 1), dtype=object)
    X[0, 0], X[1, 0] = [1], {"a": 2}
    np.savez(tmp_path / "o.npz", X=X, y=np.zeros(2))
    refused(tmp_path / "o.npz", "pickle")


def test_npz_with_string_array(tmp_path):
    np.savez(tmp_path / "s.npz", X=np.array([["a"], ["b"]]), y=np.zeros(2))
    refused(tmp_path / "s.npz", "array X has non-numeric dtype")


def test_npz_that_is_a_broken_zip(tmp_path):
    path = tmp_path / "z.npz"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    refused(path, "not a readable .npz file")


def test_npz_that_is_a_zip_of_something_else(tmp_path):
    path = tmp_path / "other.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    refused(path, "lacks array")


def test_npz_that_is_plain_text_is_reported_as_not_an_npz(tmp_path):
    refused(write(tmp_path / "t.npz", "x,label\n1,0\n"), "not a readable .npz file")


def test_npy_file_named_npz(tmp_path):
    with open(tmp_path / "a.npz", "wb") as fh:
        np.save(fh, np.ones((2, 2)))
    refused(tmp_path / "a.npz", r"\.npz")


def test_values_overflowing_float32_are_refused(tmp_path):
    np.savez(tmp_path / "big.npz", X=np.array([[1e300], [1.0]]), y=np.zeros(2))
    with np.errstate(over="ignore"):
        refused(tmp_path / "big.npz", "NaN or infinite")


def test_csv_with_utf8_bom(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("label,x\n1,2\n".encode("utf-8-sig"))
    assert len(load_dataset(path, "label")) == 1


def test_x_without_feature_axis(tmp_path):
    np.savez(tmp_path / "v.npz", X=np.ones(3), y=np.zeros(3))
    refused(tmp_path / "v.npz", "samples axis")


def test_y_not_matching_x(tmp_path):
    np.savez(tmp_path / "y.npz", X=np.ones((3, 2)), y=np.zeros(2))
    refused(tmp_path / "y.npz", r"does not match 3 samples")


def test_no_samples(tmp_path):
    np.savez(tmp_path / "0.npz", X=np.ones((0, 2)), y=np.zeros(0))
    refused(tmp_path / "0.npz", "no samples")


# -- data against the model (the trainer's check) ------------------------------------------


def _csv_dataset(tmp_path, text: str):
    return load_dataset(write(tmp_path / "t.csv", text))


CE = TrainSpec(loss="cross_entropy")


@pytest.mark.parametrize(
    "labels", [("0", "3"), ("-1", "0"), ("0.5", "1")], ids=["too big", "negative", "fractional"]
)
def test_labels_out_of_range_for_cross_entropy(tmp_path, labels):
    ds = _csv_dataset(tmp_path, f"a,b,label\n1,2,{labels[0]}\n3,4,{labels[1]}\n")
    model = nn.Linear(2, 3)
    with pytest.raises(DataError) as info:
        tensors_for(model, ds.X, ds.y, CE, source=str(ds.path))
    assert str(ds.path) in str(info.value)
    assert "labels must be class indices 0..2" in str(info.value)


def test_samples_that_do_not_fit_the_model(tmp_path):
    ds = _csv_dataset(tmp_path, "a,b,c,d,label\n1,2,3,4,0\n5,6,7,8,1\n")
    model = nn.Linear(3, 2)
    model.train()
    with pytest.raises(DataError) as info:
        tensors_for(model, ds.X, ds.y, CE, source=str(ds.path))
    message = str(info.value)
    assert str(ds.path) in message and "samples shaped (4,) do not fit the model" in message
    assert model.training  # the probe restored the mode


def test_regression_target_for_a_multi_output_model(tmp_path):
    ds = _csv_dataset(tmp_path, "a,label\n1,0.5\n2,0.25\n")
    with pytest.raises(DataError, match=r"needs a single target") as info:
        tensors_for(nn.Linear(1, 2), ds.X, ds.y, TrainSpec(loss="mse"), source=str(ds.path))
    assert str(ds.path) in str(info.value)


def test_tensors_for_happy_paths(tmp_path):
    ds = _csv_dataset(tmp_path, "a,b,label\n1,2,0\n3,4,2\n5,6,1\n")
    inputs, targets = tensors_for(nn.Linear(2, 3), ds.X, ds.y, CE)
    assert inputs.dtype == torch.float32 and inputs.shape == (3, 2)
    assert targets.dtype == torch.int64 and targets.tolist() == [0, 2, 1]
    _, reg = tensors_for(nn.Linear(2, 1), ds.X, ds.y, TrainSpec(loss="mse"))
    assert reg.dtype == torch.float32 and reg.shape == (3, 1)


# -- cnn1d takes windows: flat rows are reshaped, or refused in one line ------------------------


def test_flat_rows_become_cnn1d_windows_channel_after_channel(tmp_path):
    windows = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)
    header = ",".join(f"c{c}_t{t}" for c in range(3) for t in range(8))
    rows = [",".join(str(v) for v in w.reshape(-1)) + ",1" for w in windows]
    path = write(tmp_path / "w.csv", "\n".join([header + ",label", *rows]) + "\n")
    data = load_dataset(path)
    shaped = shape_for(data.X, ModelSpec("cnn1d", {"in_channels": 3, "num_classes": 2}), path)
    assert shaped.shape == (2, 3, 8) and np.array_equal(shaped, windows)
    assert shape_for(windows, ModelSpec("cnn1d", {"in_channels": 3}), path) is windows
    assert shape_for(data.X, ModelSpec("mlp", {"in_features": 24}), path) is data.X


@pytest.mark.parametrize(
    ("X_shape", "args", "expected"),
    [
        (
            (4, 5),
            {"in_channels": 6, "num_classes": 7},
            r"cnn1d expects rows of in_channels x time = 6 x T values .*got 5 feature columns",
        ),
        (
            (4, 5, 32),
            {"in_channels": 6, "num_classes": 7},
            r"cnn1d expects samples shaped \(in_channels, time\) = \(6, T\); got \(5, 32\)",
        ),
        (
            (4, 6),
            {"in_channels": 6, "num_classes": 7},
            "cnn1d with 2 pooling blocks needs time >= 4 steps per window; got 1",
        ),
        (
            (4, 6, 7),
            {"in_channels": 6, "num_classes": 7, "channels": [4, 4, 4]},
            "cnn1d with 3 pooling blocks needs time >= 8 steps per window; got 7",
        ),
    ],
)
def test_data_that_cannot_be_cnn1d_windows_is_one_clear_line(tmp_path, X_shape, args, expected):
    path = tmp_path / "data.csv"
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: {expected}"):
        shape_for(np.zeros(X_shape, dtype=np.float32), ModelSpec("cnn1d", args), path)


# -- the CLI turns it into one clear line -------------------------------------------------


def _clean_env() -> dict[str, str | None]:
    return {k: None for k in os.environ if k.startswith("FEDMQ_")}


@pytest.mark.parametrize("problem", ["missing", "ragged"])
def test_agent_cli_reports_a_bad_data_file_without_traceback(tmp_path, problem):
    from fedmq.cli import main

    if problem == "missing":
        data, expected = tmp_path / "missing.csv", "data file not found"
    else:
        data = write(tmp_path / "ragged.csv", "x,label\n1\n")
        expected = "line 2 has 1 fields, header has 2"
    result = CliRunner(env=_clean_env()).invoke(
        main,
        [
            "agent",
            "run",
            "--broker",
            "127.0.0.1:1",
            "--federation",
            "f",
            "--device-id",
            "d",
            "--data",
            str(data),
            "--insecure",
        ],
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert str(data) in result.output and expected in result.output, result.output
    assert "Traceback" not in result.output
