"""Objects rendered to artifact bytes (tracklane._artifacts.kinds): the same bytes and file names real MLflow
writes for log_text, log_dict, log_figure, log_image and log_table, and the object form that round-trips
and refuses what it cannot store safely.

MLflow itself runs once, in a subprocess writing to a local file store, so no MLflow state is set in the
pytest process; its inputs come from ``sample_inputs`` below, the same objects the tests render."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tracklane._artifacts import kinds
from tracklane._exceptions import ConfigurationError, InvalidInputError

pytestmark = pytest.mark.unit

TIMESTAMP = 1_700_000_000_000
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def sample_figure() -> Any:
    """The matplotlib figure both MLflow and the tests render (not through pyplot: nothing to close)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3, 2), dpi=50)
    axes = figure.subplots()
    axes.plot([0, 1, 2], [2, 3, 1], label="loss")
    axes.set_title("Verlust — épocas")
    axes.legend()
    return figure


def sample_inputs() -> dict[str, Any]:
    """The objects both MLflow (in the subprocess) and the tests render; built fresh on each call."""
    rng = np.random.default_rng(7)
    gradient = np.linspace(0, 1, 24 * 32).reshape(24, 32)
    return {
        "text": "first line\nzweite Zeile: äöü ✓\n\ttabbed, no trailing newline",
        "dict": {
            "model": {"name": "résnet", "layers": [64, 128, 256], "dropout": 0.25},
            "flags": [True, False, None],
            "when": datetime.date(2024, 5, 17),
            "zeta": "last key, unsorted",
            "alpha": 1,
        },
        "arrays": {
            "uint8_rgb": rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8),
            "uint8_rgba": rng.integers(0, 256, size=(20, 10, 4), dtype=np.uint8),
            "int64_gray": rng.integers(0, 256, size=(16, 16), dtype=np.int64),
            "float_gray": gradient,
            "float_hw1": gradient.reshape(24, 32, 1).astype(np.float32),
            "bool_mask": gradient > 0.5,
            "float_out_of_range": gradient * 4 - 1,
        },
        "pil": Image.fromarray(rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)),
        "step_image": rng.integers(0, 256, size=(300, 120, 3), dtype=np.uint8),
        "table": {
            "inputs": ["What is MLflow?", "Was ist tracklane?"],
            "outputs": ["MLflow is ...", "ein Client — schnell"],
            "toxicity": [0.0, 0.125],
            "when": [datetime.datetime(2024, 5, 17, 12, 30), datetime.datetime(2024, 5, 18, 1, 2, 3)],
        },
        "scalar_table": {"inputs": "one row only", "score": 3},
        "frame": pd.DataFrame({"step": [1, 2, 3], "loss": [0.5, 0.25, 0.125], "tag": ["a", "b", "c"]}),
        "more_rows": {"step": [4], "loss": [0.0625], "tag": ["d"]},
        "gallery": {
            "prompt": ["a dog", "a cat"],
            "picture": [
                Image.fromarray(rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)),
                Image.fromarray(rng.integers(0, 256, size=(50, 20, 3), dtype=np.uint8)),
            ],
        },
    }


_MLFLOW_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    from urllib.parse import urlparse, unquote
    sys.path.insert(0, sys.argv[1])
    warnings.simplefilter("ignore")
    from test_artifact_kinds import TIMESTAMP, sample_figure, sample_inputs
    import mlflow
    from mlflow import MlflowClient
    from tracklane._artifacts import kinds

    inputs = sample_inputs()
    client = MlflowClient(tracking_uri="file:" + sys.argv[2])
    run_id = client.create_run(client.create_experiment("kinds")).info.run_id
    client.log_text(run_id, inputs["text"], "notes/readme.txt")
    for name in ("params.json", "params.yaml", "params.yml", "params.txt", "params"):
        client.log_dict(run_id, inputs["dict"], "config/" + name)
    client.log_figure(run_id, sample_figure(), "plots/line.png")
    for name, array in inputs["arrays"].items():
        client.log_image(run_id, array, "static/" + name + ".png")
    client.log_image(run_id, inputs["pil"], "static/pil.jpg")
    client.log_image(run_id, inputs["pil"], "static/pil.webp")
    client.log_image(run_id, inputs["step_image"], key="sample/frames", step=3, timestamp=TIMESTAMP)
    client.log_table(run_id, inputs["table"], "tables/eval.json")
    client.log_table(run_id, inputs["scalar_table"], "tables/scalar.json")
    client.log_table(run_id, inputs["frame"], "tables/frame.parquet")
    client.log_table(run_id, inputs["frame"], "tables/append.json")
    client.log_table(run_id, inputs["more_rows"], "tables/append.json")
    client.log_table(run_id, inputs["gallery"], "tables/gallery.json")
    # mlflow.Image can only be built with MLflow imported: render it here, for the test to compare.
    image = mlflow.Image(inputs["arrays"]["uint8_rgb"])
    client.log_image(run_id, image, "static/mlflow_image.png")
    ours = kinds.image_bytes(image, "static/mlflow_image.png")
    run = client.get_run(run_id)
    print(json.dumps({
        "artifacts": unquote(urlparse(run.info.artifact_uri).path),
        "tags": run.data.tags,
        "mlflow_image_ours": ours.hex(),
    }))
    """
)


@pytest.fixture(scope="module")
def mlflow_wrote(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What MLflow 3.17 itself stored for ``sample_inputs``: the artifact root and the run's tags."""
    store = tmp_path_factory.mktemp("mlruns")
    env = {
        **os.environ,
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "MPLBACKEND": "Agg",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_ENABLE_ASYNC_LOGGING", None)
    done = subprocess.run(
        [sys.executable, "-c", _MLFLOW_SCRIPT, str(Path(__file__).parent), str(store)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=store,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["root"] = Path(result.pop("artifacts"))
    return result


def _stored(mlflow_wrote: dict[str, Any], path: str) -> bytes:
    return (mlflow_wrote["root"] / path).read_bytes()


def _pixels(data: bytes) -> tuple[str, tuple[int, int], bytes]:
    with Image.open(io.BytesIO(data)) as image:
        return image.mode, image.size, image.tobytes()


# --- log_text / log_dict ------------------------------------------------------------------------------


def test_text_bytes_are_what_mlflow_stores(mlflow_wrote: dict[str, Any]) -> None:
    assert kinds.text_bytes(sample_inputs()["text"]) == _stored(mlflow_wrote, "notes/readme.txt")


@pytest.mark.parametrize("name", ["params.json", "params.yaml", "params.yml", "params.txt", "params"])
def test_dict_bytes_are_what_mlflow_stores_for_each_extension(
    mlflow_wrote: dict[str, Any], name: str
) -> None:
    ours = kinds.dict_bytes(sample_inputs()["dict"], f"config/{name}")
    assert ours == _stored(mlflow_wrote, f"config/{name}")


def test_yaml_dict_without_pyyaml_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # what an environment without PyYAML looks like

    with pytest.raises(ConfigurationError, match=r"pip install pyyaml.*\.json"):
        kinds.dict_bytes({"a": 1}, "config.yaml")
    assert kinds.dict_bytes({"a": 1}, "config.json") == b'{\n  "a": 1\n}'


def test_text_that_is_not_a_str_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="log_text takes a str, got bytes"):
        kinds.text_bytes(b"raw")  # type: ignore[arg-type]


# --- log_figure ---------------------------------------------------------------------------------------


def test_matplotlib_png_figure_bytes_are_what_mlflow_stores(mlflow_wrote: dict[str, Any]) -> None:
    assert kinds.figure_bytes(sample_figure(), "plots/line.png", None) == _stored(
        mlflow_wrote, "plots/line.png"
    )


@pytest.mark.parametrize(("name", "magic"), [("f.svg", b"<?xml"), ("f.pdf", b"%PDF"), ("f.jpg", b"\xff\xd8")])
def test_matplotlib_figure_takes_its_format_from_the_extension(name: str, magic: bytes) -> None:
    assert kinds.figure_bytes(sample_figure(), f"plots/{name}", None).startswith(magic)


def test_figure_save_kwargs_reach_savefig() -> None:
    figure = sample_figure()
    small = kinds.figure_bytes(figure, "f.png", {"dpi": 20})
    large = kinds.figure_bytes(figure, "f.png", {"dpi": 100})
    assert _pixels(small)[1] == (60, 40)
    assert _pixels(large)[1] == (300, 200)


def test_figure_of_unknown_type_is_refused_by_name() -> None:
    with pytest.raises(InvalidInputError, match=r"matplotlib.*plotly.*got numpy\.ndarray"):
        kinds.figure_bytes(np.zeros((2, 2)), "f.png", None)


def test_figure_file_without_extension_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="no extension"):
        kinds.figure_bytes(sample_figure(), "plots/line", None)


def test_figure_in_unknown_format_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="xyz"):
        kinds.figure_bytes(sample_figure(), "plots/line.xyz", None)


# --- log_image ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["uint8_rgb", "uint8_rgba", "int64_gray", "float_gray", "float_hw1", "bool_mask", "float_out_of_range"],
)
def test_numpy_image_bytes_are_what_mlflow_stores(mlflow_wrote: dict[str, Any], name: str) -> None:
    array = sample_inputs()["arrays"][name]
    with pytest.warns(UserWarning, match="rescaled") if name == "float_out_of_range" else _no_warning():
        ours = kinds.image_bytes(array, f"static/{name}.png")
    assert ours == _stored(mlflow_wrote, f"static/{name}.png")


@pytest.mark.parametrize("name", ["pil.jpg", "pil.webp"])
def test_pil_image_bytes_are_what_mlflow_stores(mlflow_wrote: dict[str, Any], name: str) -> None:
    assert kinds.image_bytes(sample_inputs()["pil"], f"static/{name}") == _stored(
        mlflow_wrote, f"static/{name}"
    )


def test_mlflow_image_object_bytes_are_what_mlflow_stores(mlflow_wrote: dict[str, Any]) -> None:
    ours = bytes.fromhex(mlflow_wrote["mlflow_image_ours"])
    assert ours == _stored(mlflow_wrote, "static/mlflow_image.png")


def test_image_without_file_name_is_png() -> None:
    data = kinds.image_bytes(sample_inputs()["arrays"]["uint8_rgb"], None)
    assert data.startswith(b"\x89PNG")
    assert _pixels(data)[:2] == ("RGB", (32, 24))


def test_step_image_files_have_mlflow_names_bytes_and_tag(mlflow_wrote: dict[str, Any]) -> None:
    theirs = sorted(
        p.relative_to(mlflow_wrote["root"]).as_posix() for p in (mlflow_wrote["root"] / "images").iterdir()
    )

    ours = kinds.image_step_files(sample_inputs()["step_image"], "sample/frames", step=3, timestamp=TIMESTAMP)

    assert sorted(UUID.sub("<uuid>", p) for p, _ in ours) == [UUID.sub("<uuid>", p) for p in theirs]
    assert len({UUID.search(p).group() for p, _ in ours}) == 1  # type: ignore[union-attr]
    for (_, data), path in zip(sorted(ours), theirs, strict=True):
        assert data == _stored(mlflow_wrote, path)
    assert _pixels(ours[1][1])[1] == (102, 256)  # the thumbnail: longer side 256 px, aspect kept
    assert mlflow_wrote["tags"][kinds.LOGGED_IMAGES_TAG] == kinds.LOGGED_IMAGES_TAG_VALUE


def test_step_image_defaults_step_zero_and_the_current_time() -> None:
    (path, _), _ = kinds.image_step_files(np.zeros((4, 4)), "mask")
    match = re.fullmatch(r"images/mask\+step\+0\+timestamp\+(\d+)\+" + UUID.pattern + r"\.png", path)
    assert match is not None
    assert abs(int(match.group(1)) - int(datetime.datetime.now().timestamp() * 1000)) < 3_600_000


def test_step_image_key_with_other_characters_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="may only hold letters"):
        kinds.image_step_files(np.zeros((4, 4)), "loss#1", step=1)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((4, 4), dtype=np.complex64), "dtype complex64 is not an image"),
        (np.zeros((4,), dtype=np.uint8), r"shape \(4,\) is not an image"),
        (np.zeros((4, 4, 2), dtype=np.uint8), "has 2 channels"),
        (np.full((4, 4), 300, dtype=np.int32), r"must lie in \[0, 255\], found 300"),
        (np.full((4, 4), -1, dtype=np.int8), r"found -1"),
        ([[0, 1], [1, 0]], "got list"),
    ],
)
def test_image_that_mlflow_refuses_is_refused_with_the_reason(image: object, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        kinds.image_bytes(image, "x.png")


def test_image_in_a_format_that_cannot_hold_it_is_refused() -> None:
    rgba = sample_inputs()["arrays"]["uint8_rgba"]
    with pytest.raises(InvalidInputError, match=r"RGBA.*convert\('RGB'\)"):
        kinds.image_bytes(rgba, "x.jpg")
    with pytest.raises(InvalidInputError, match="cannot tell an image format"):
        kinds.image_bytes(rgba, "x.unknown")


# --- log_table ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ("table", "tables/eval.json"),
        ("scalar_table", "tables/scalar.json"),
        ("frame", "tables/frame.parquet"),
    ],
)
def test_table_bytes_are_what_mlflow_stores(mlflow_wrote: dict[str, Any], data: str, path: str) -> None:
    assert kinds.table_bytes(sample_inputs()[data], path) == _stored(mlflow_wrote, path)


def test_table_json_is_split_orient_with_columns_and_data() -> None:
    stored = json.loads(kinds.table_bytes({"a": [1, 2], "b": ["x", "y"]}, "t.json"))
    assert stored == {"columns": ["a", "b"], "data": [[1, "x"], [2, "y"]]}


def test_table_appended_to_existing_is_what_mlflow_stores(mlflow_wrote: dict[str, Any]) -> None:
    inputs = sample_inputs()
    first = kinds.table_bytes(inputs["frame"], "tables/append.json")

    both = kinds.table_bytes(inputs["more_rows"], "tables/append.json", existing=first)

    assert both == _stored(mlflow_wrote, "tables/append.json")


def test_table_with_image_column_has_mlflow_files_and_cells(mlflow_wrote: dict[str, Any]) -> None:
    files = kinds.table_files(sample_inputs()["gallery"], "tables/gallery.json")

    theirs = json.loads(_stored(mlflow_wrote, "tables/gallery.json"))
    ours = json.loads(files[-1][1])
    assert files[-1][0] == "tables/gallery.json"
    assert json.loads(UUID.sub("<uuid>", json.dumps(ours))) == json.loads(
        UUID.sub("<uuid>", json.dumps(theirs))
    )
    for cell_ours, cell_theirs in zip(ours["data"], theirs["data"], strict=True):
        for key in ("filepath", "compressed_filepath"):
            assert dict(files)[cell_ours[1][key]] == _stored(mlflow_wrote, cell_theirs[1][key])
    assert len(files) == 5  # two images, two thumbnails, the table


def test_table_with_image_column_needs_table_files() -> None:
    with pytest.raises(InvalidInputError, match="table_files"):
        kinds.table_bytes(sample_inputs()["gallery"], "gallery.json")


def test_table_run_tag_is_what_mlflow_sets(mlflow_wrote: dict[str, Any]) -> None:
    value: str | None = None
    for path in ("tables/eval.json", "tables/scalar.json", "tables/frame.parquet", "tables/append.json"):
        tag = kinds.table_run_tag(path, value)
        assert tag is not None and tag[0] == kinds.LOGGED_ARTIFACTS_TAG
        value = tag[1]
    assert kinds.table_run_tag("tables/append.json", value) is None  # listed once, as MLflow
    tag = kinds.table_run_tag("tables/gallery.json", value)
    assert tag is not None
    assert tag[1] == mlflow_wrote["tags"][kinds.LOGGED_ARTIFACTS_TAG]


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        ({"a": [1]}, "t.csv", r"\.json or \.parquet"),
        ({"a": [1]}, "t[1].json", "forbids"),
        ([1, 2], "t.json", "dict of columns or a pandas.DataFrame, got list"),
        ({"picture": [Image.new("RGB", (2, 2)), "text"]}, "t.json", "mixes images"),
    ],
)
def test_table_that_mlflow_refuses_is_refused_with_the_reason(data: object, path: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        kinds.table_bytes(data, path)


def test_table_rendering_leaves_the_callers_frame_alone() -> None:
    frame = pd.DataFrame({"picture": [Image.new("RGB", (2, 2))]})
    kinds.table_files(frame, "t.json")
    assert isinstance(frame["picture"][0], Image.Image)


# --- omega|ml's object form ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        {"lr": 0.1, "layers": [1, 2, {"deep": None}], "name": "ünï", "ok": True},
        [1, 2.5, "x", None, False, []],
        "just text",
        42,
        -0.5,
        True,
        None,
        {},
    ],
)
def test_json_objects_round_trip(obj: object) -> None:
    name, data = kinds.object_bytes(obj, "thing")
    assert name == "thing.json"
    assert kinds.restore_object(name, data) == obj


def test_nan_and_tuples_come_back_as_json_reads_them() -> None:
    name, data = kinds.object_bytes({"loss": [float("nan"), float("inf")], "shape": (3, 4)}, "stats")
    restored = kinds.restore_object(name, data)
    assert isinstance(restored, dict)
    assert np.isnan(restored["loss"][0]) and restored["loss"][1] == float("inf")
    assert restored["shape"] == [3, 4]


@pytest.mark.parametrize("obj", [b"\x00\x01binary\xff", bytearray(b"mutable")])
def test_bytes_round_trip_as_they_are(obj: bytes | bytearray) -> None:
    name, data = kinds.object_bytes(obj, "blob")
    assert name == "blob.bin"
    assert data == bytes(obj)
    assert kinds.restore_object(name, data) == bytes(obj)


def test_dataframe_round_trips_as_parquet() -> None:
    frame = pd.DataFrame(
        {"step": [1, 2], "loss": [0.5, 0.25], "when": pd.to_datetime(["2024-01-01", "2024-01-02"])},
        index=pd.Index(["a", "b"], name="key"),
    )

    name, data = kinds.object_bytes(frame, "history")

    assert name == "history.parquet"
    assert data.startswith(b"PAR1")
    pd.testing.assert_frame_equal(kinds.restore_object(name, data), frame)  # type: ignore[arg-type]


def test_dataframe_without_pyarrow_round_trips_as_csv() -> None:
    # A process where pyarrow cannot be imported at all, as pandas sees an environment without it.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["pyarrow"] = None
        import pandas as pd
        from tracklane._artifacts import kinds
        frame = pd.DataFrame({"step": [1, 2], "loss": [0.5, 0.25], "tag": ["x", "y"]})
        name, data = kinds.object_bytes(frame, "history")
        pd.testing.assert_frame_equal(kinds.restore_object(name, data), frame)
        print(name)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip() == "history.csv"


class _Model:
    pass


@pytest.mark.parametrize(
    ("obj", "where"),
    [
        (_Model(), r"obj is of type test_artifact_kinds\._Model"),
        ({"weights": {"w": _Model()}}, r"obj\['weights'\]\['w'\] is of type"),
        ({1: "one"}, "has the key 1"),
        ({1, 2}, "obj is of type set"),
        (np.arange(3), r"obj is of type numpy\.ndarray"),
    ],
)
def test_other_objects_are_refused_and_never_pickled(obj: object, where: str) -> None:
    with pytest.raises(InvalidInputError, match=where) as refused:
        kinds.object_bytes(obj, "thing")
    assert "pickle is never used" in str(refused.value)
    assert "runs whatever code" in str(refused.value)


def test_object_that_contains_itself_is_refused() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(InvalidInputError, match="contains itself"):
        kinds.object_bytes(loop, "loop")


def test_restoring_a_pickle_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="will not load the pickle"):
        kinds.restore_object("model.pkl", b"\x80\x04N.")
    with pytest.raises(InvalidInputError, match="cannot tell the format"):
        kinds.restore_object("model.joblib", b"")


# --- shape of the module ------------------------------------------------------------------------------


def test_importing_kinds_imports_no_optional_library() -> None:
    code = (
        "import sys, tracklane._artifacts.kinds\n"
        "heavy = ('numpy', 'PIL', 'matplotlib', 'plotly', 'pandas', 'pyarrow', 'yaml', 'mlflow')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_artifact_file_splits_like_mlflow_and_refuses_escapes() -> None:
    assert kinds.split_artifact_file("a/./b/../c/file.txt") == ("a/c", "file.txt")
    assert kinds.split_artifact_file("file.txt") == (None, "file.txt")
    for bad in ("", "/etc/passwd", "../up.txt", "dir/", "a/../.."):
        with pytest.raises(InvalidInputError):
            kinds.split_artifact_file(bad)


@contextlib.contextmanager
def _no_warning() -> Iterator[None]:
    """Fail the test on any warning (``pytest.warns(None)`` is gone)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield
