"""In-memory objects rendered to the exact bytes and file names MLflow 3.17 stores for them.

Pure functions, no files and no network: a face calls one at log time, snapshots the bytes into the
journal and returns; the worker uploads later. Where MLflow's output is deterministic these are its own
bytes (reference: ``mlflow/tracking/client.py`` ``log_text``/``log_dict``/``log_figure``/``log_image``/
``log_table`` and ``mlflow/tracking/multimedia.py``), so MLflow's UI and readers see no difference.

numpy, Pillow, matplotlib, plotly, pandas, pyarrow and PyYAML are optional: each is imported only when an
object needs it, and a missing one is a ``ConfigurationError`` that names the package to install. A type
is recognised only when its library is already imported (a user holding a DataFrame has imported pandas),
as MLflow does for figures.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import posixpath
import re
import sys
import time
import uuid
import warnings
from collections.abc import Mapping
from typing import Any

from tracklane._exceptions import ConfigurationError, InvalidInputError

# Run tags MLflow sets next to these artifacts (mlflow/utils/mlflow_tags.py); its UI reads them.
LOGGED_IMAGES_TAG = "mlflow.loggedImages"
LOGGED_IMAGES_TAG_VALUE = "True"  # MlflowClient.set_tag(run_id, key, True) stores str(True)
LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"

# mlflow/tracking/multimedia.py COMPRESSED_IMAGE_SIZE: the longer side of the thumbnails the UI shows.
_THUMBNAIL_SIZE = 256
# MlflowClient.log_image: allowed characters of a step-wise image key.
_IMAGE_KEY = re.compile(r"^[a-zA-Z0-9_\-./ ]+$")
# MlflowClient.log_figure: the only image formats it writes a plotly figure to.
_PLOTLY_IMAGE_EXTENSIONS = (".png", ".jpeg", ".webp", ".svg", ".pdf")
# MlflowClient._check_artifact_file_string: characters a table's file name may not hold.
_TABLE_FORBIDDEN = ('"', "'", ",", ":", "[", "]", "{", "}")

# The object form's formats, by file suffix; pickle is deliberately absent (see object_bytes).
_JSON, _BYTES, _PARQUET, _CSV = ".json", ".bin", ".parquet", ".csv"
OBJECT_SUFFIXES = (_JSON, _BYTES, _PARQUET, _CSV)


def split_artifact_file(artifact_file: str) -> tuple[str | None, str]:
    """Split a run-relative posix file path into (directory or None, file name), as MLflow's
    ``_log_artifact_helper`` does before it uploads.

    Raises:
        InvalidInputError: the path is empty, absolute, ends in ``/`` or climbs out of the run with ``..``.
    """
    if not isinstance(artifact_file, str) or not artifact_file.strip():
        raise InvalidInputError(
            f"artifact_file must be a non-empty run-relative path like 'dir/file.txt', got {artifact_file!r}."
        )
    if artifact_file.startswith("/") or artifact_file.endswith("/"):
        raise InvalidInputError(
            f"artifact_file {artifact_file!r} must be a relative path to a file, like 'dir/file.txt': "
            "drop the leading or trailing '/'."
        )
    norm = posixpath.normpath(artifact_file)
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise InvalidInputError(
            f"artifact_file {artifact_file!r} points outside the run's artifact root; use a path below it, "
            "like 'dir/file.txt'."
        )
    directory = posixpath.dirname(norm)
    return (directory or None), posixpath.basename(norm)


def text_bytes(text: str) -> bytes:
    """The bytes ``log_text`` stores: the text as UTF-8, unchanged (MLflow writes it with
    ``encoding="utf-8"``; newlines are kept as given, as on Linux).

    Raises:
        InvalidInputError: ``text`` is not a str or cannot be encoded (a lone surrogate).
    """
    if not isinstance(text, str):
        raise InvalidInputError(
            f"log_text takes a str, got {_type_name(text)}; pass str(value), or log bytes with log_artifact."
        )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"log_text: the text cannot be written as UTF-8 ({exc.reason} at position {exc.start}); "
            "remove or replace that character."
        ) from exc


def dict_bytes(dictionary: object, artifact_file: str) -> bytes:
    """The bytes ``log_dict`` stores: YAML for a ``.yaml``/``.yml`` file (``yaml.dump`` with ``indent=2,
    default_flow_style=False``), else JSON (``indent=2``, objects JSON cannot hold written as ``str()``).

    Raises:
        ConfigurationError: a YAML file was asked for and PyYAML is not installed.
        InvalidInputError: the object cannot be serialized (a reference cycle, for instance).
    """
    extension = posixpath.splitext(artifact_file)[1]  # case-sensitive, as MLflow's check
    if extension in (".yml", ".yaml"):
        try:
            yaml = importlib.import_module("yaml")
        except ImportError as exc:
            raise ConfigurationError(
                f"log_dict to {artifact_file!r} writes YAML, which needs PyYAML: pip install pyyaml, "
                "or give the file a .json name."
            ) from exc
        try:
            rendered: str = yaml.dump(dictionary, indent=2, default_flow_style=False)
        except yaml.YAMLError as exc:
            raise InvalidInputError(f"log_dict could not write {artifact_file!r} as YAML: {exc}") from exc
    else:
        try:
            rendered = json.dumps(dictionary, indent=2, default=str)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(
                f"log_dict could not write {artifact_file!r} as JSON: {exc}. Remove reference cycles and "
                "use str keys."
            ) from exc
    # PyYAML (allow_unicode=False) and json (ensure_ascii=True) escape non-ASCII: the text is ASCII, so
    # MLflow's platform-encoded write gives these bytes everywhere.
    return rendered.encode("utf-8")


def figure_bytes(figure: object, artifact_file: str, save_kwargs: Mapping[str, Any] | None = None) -> bytes:
    """The bytes ``log_figure`` stores: a matplotlib figure saved in the format its extension names
    (``savefig``), or a plotly figure as ``.html`` (``write_html``, plotly.js from its CDN) or as
    .png/.jpeg/.webp/.svg/.pdf (``write_image``). ``save_kwargs`` go to that method.

    Raises:
        InvalidInputError: not a matplotlib or plotly figure, or a format the library cannot write.
        ConfigurationError: plotly needs ``kaleido`` for image formats and it is missing.
    """
    kwargs = dict(save_kwargs or {})
    extension = posixpath.splitext(posixpath.basename(artifact_file))[1]
    # Only a library already imported can have made the figure: neither is imported to check (MLflow's rule).
    if "matplotlib" in sys.modules and isinstance(figure, _class("matplotlib.figure", "Figure")):
        if "format" not in kwargs:
            if not extension[1:]:
                raise InvalidInputError(
                    f"log_figure: {artifact_file!r} has no extension to choose the image format; "
                    "name it like 'figure.png' (or .svg, .pdf, .jpg)."
                )
            kwargs["format"] = extension[1:]
        buffer = io.BytesIO()
        try:
            figure.savefig(buffer, **kwargs)  # type: ignore[attr-defined]
        except ValueError as exc:  # "Format 'xyz' is not supported (supported formats: ...)"
            raise InvalidInputError(f"log_figure could not save {artifact_file!r}: {exc}") from exc
        return buffer.getvalue()
    if "plotly" in sys.modules and isinstance(figure, _class("plotly.graph_objects", "Figure")):
        return _plotly_bytes(figure, artifact_file, extension, kwargs)
    raise InvalidInputError(
        f"log_figure takes a matplotlib.figure.Figure or a plotly.graph_objects.Figure, got "
        f"{_type_name(figure)}; for an image array use log_image."
    )


def _plotly_bytes(figure: Any, artifact_file: str, extension: str, kwargs: dict[str, Any]) -> bytes:
    """A plotly figure rendered as MLflow's ``log_figure`` writes it."""
    if extension == ".html":
        kwargs.setdefault("include_plotlyjs", "cdn")
        kwargs.setdefault("auto_open", False)
        text = io.StringIO()
        figure.write_html(text, **kwargs)
        return text.getvalue().encode("utf-8")  # plotly writes a path as UTF-8
    if extension not in _PLOTLY_IMAGE_EXTENSIONS:
        raise InvalidInputError(
            f"log_figure cannot write a plotly figure to {artifact_file!r}: use an .html file or one of "
            f"{', '.join(_PLOTLY_IMAGE_EXTENSIONS)} (as MLflow)."
        )
    kwargs.setdefault("format", extension[1:])
    try:
        rendered: bytes = figure.to_image(**kwargs)
    except ValueError as exc:  # plotly says so when kaleido is missing
        if "kaleido" in str(exc).lower():
            raise ConfigurationError(
                f"log_figure: plotly needs kaleido to write {artifact_file!r}: pip install kaleido, "
                "or name the file .html."
            ) from exc
        raise InvalidInputError(f"log_figure could not save {artifact_file!r}: {exc}") from exc
    return rendered


def image_bytes(image: object, artifact_file: str | None = None) -> bytes:
    """The bytes ``log_image(image, artifact_file)`` stores: the image (a PIL image, an ``mlflow.Image``
    or a numpy array under MLflow's rules, see ``_to_pil``) saved by Pillow in the format of the file's
    extension; PNG when no file is named.

    Raises:
        InvalidInputError: not an image, an array MLflow refuses, or a format Pillow cannot write it in.
        ConfigurationError: Pillow is not installed.
    """
    pil = _to_pil(image)
    file_format = "PNG" if artifact_file is None else _pil_format(artifact_file)
    return _pil_save(pil, file_format, artifact_file or "the image")


def image_step_files(
    image: object, key: str, step: int | None = None, timestamp: int | None = None
) -> list[tuple[str, bytes]]:
    """The files ``log_image(image, key=, step=, timestamp=)`` stores, as (run-relative path, bytes):
    the full image as PNG and a thumbnail (longer side 256 px) as WebP, named
    ``images/<key with / as ~>+step+<step>+timestamp+<ms>+<uuid4>[+compressed].<ext>``, the names MLflow's
    UI groups into its image charts. Set the run tag ``LOGGED_IMAGES_TAG`` = ``LOGGED_IMAGES_TAG_VALUE``
    with them. ``step`` defaults to 0 and ``timestamp`` (ms) to now, as in MLflow (0 counts as unset).

    Raises:
        InvalidInputError: a key with characters other than letters, digits, ``_ - . /`` and space, a step
            or timestamp that is not an int, or an image ``image_bytes`` refuses.
    """
    if not isinstance(key, str) or not _IMAGE_KEY.match(key):
        raise InvalidInputError(
            f"log_image key {key!r} may only hold letters, digits, '_', '-', '.', '/' and spaces; "
            "rename it (MLflow's rule)."
        )
    for name, value in (("step", step), ("timestamp", timestamp)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidInputError(f"log_image {name} must be an int, got {value!r}.")
    step = step or 0
    timestamp = timestamp or int(time.time() * 1000)  # MLflow's get_current_time_millis
    pil = _to_pil(image)
    stem = f"images/{key.replace('/', '~')}+step+{step}+timestamp+{timestamp}+{uuid.uuid4()}"
    thumbnail = _thumbnail(pil)
    return [
        (f"{stem}.png", _pil_save(pil, "PNG", key)),
        (f"{stem}+compressed.webp", _pil_save(thumbnail, "WEBP", key)),
    ]


def table_bytes(data: object, artifact_file: str, existing: bytes | None = None) -> bytes:
    """The bytes ``log_table`` stores for a table without image cells; ``table_files`` has the rules.

    Raises:
        InvalidInputError: as ``table_files``, or the table holds images (use ``table_files``, which also
            returns the image files).
        ConfigurationError: as ``table_files``.
    """
    files = table_files(data, artifact_file, existing)
    if len(files) > 1:
        raise InvalidInputError(
            f"log_table {artifact_file!r}: the table holds images, which MLflow stores as files next to "
            "it; render it with table_files, which returns them too."
        )
    return files[0][1]


def table_files(data: object, artifact_file: str, existing: bytes | None = None) -> list[tuple[str, bytes]]:
    """The files ``log_table`` stores, as (run-relative path, bytes), the table last.

    ``data`` is a dict of columns (a dict of scalars is one row) or a pandas DataFrame. A ``.json`` table is
    ``DataFrame.to_json(orient="split", index=False, date_format="iso")`` (keys ``columns`` and ``data``), a
    ``.parquet`` one ``to_parquet(index=False)``. A column of images becomes PNG + WebP thumbnail files
    under ``table_images/<table name>/<uuid4>``, its cells ``{"type": "image", "filepath": ...,
    "compressed_filepath": ...}``. ``existing`` is the file's current content: MLflow appends the new rows to
    it. Set the run tag that ``table_run_tag`` returns with them.

    Raises:
        InvalidInputError: a file name without .json/.parquet or with one of ``"',:[]{}``, data that is not a
            dict or DataFrame, a column mixing images and other values, or cells JSON cannot hold.
        ConfigurationError: pandas (or, for .parquet, pyarrow) is not installed.
    """
    for char in _TABLE_FORBIDDEN:
        if char in artifact_file:
            raise InvalidInputError(
                f"log_table file name {artifact_file!r} holds {char!r}, which MLflow forbids; rename it."
            )
    if not artifact_file.endswith((".json", ".parquet")):
        raise InvalidInputError(
            f"log_table file name {artifact_file!r} must end in .json or .parquet, the formats MLflow reads."
        )
    pd = _require("pandas", "pandas", "log_table")
    if isinstance(data, dict):
        try:
            frame = pd.DataFrame(data)
        except ValueError:  # all scalars, {"inputs": "What is MLflow?"}: one row
            frame = pd.DataFrame([data])
    elif isinstance(data, pd.DataFrame):
        frame = data.copy()  # MLflow rewrites image columns in the caller's frame; we do not
    else:
        raise InvalidInputError(
            f"log_table takes a dict of columns or a pandas.DataFrame, got {_type_name(data)}."
        )
    files = _table_image_files(frame, artifact_file)
    if existing is not None:
        frame = pd.concat([_read_table(pd, existing, artifact_file), frame], ignore_index=True)
    try:
        if artifact_file.endswith(".json"):
            rendered = frame.to_json(orient="split", index=False, date_format="iso").encode("utf-8")
        else:
            _require("pyarrow", "pyarrow", f"log_table to {artifact_file!r} (Parquet)")
            buffer = io.BytesIO()
            frame.to_parquet(buffer, index=False)
            rendered = buffer.getvalue()
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInputError(
            f"log_table could not write {artifact_file!r}: {exc}. Keep cells to numbers, strings, booleans, "
            "dates, lists and dicts."
        ) from exc
    files.append((artifact_file, rendered))
    return files


def table_run_tag(artifact_file: str, current_value: str | None) -> tuple[str, str] | None:
    """The run tag ``log_table`` sets so MLflow's UI lists the table: (``LOGGED_ARTIFACTS_TAG``, JSON list of
    ``{"path": ..., "type": "table"}``) with this file added to the run's ``current_value``; None when it
    is listed already. A current value that is not a JSON list is replaced rather than failing the log."""
    try:
        listed = json.loads(current_value) if current_value else []
    except ValueError:
        listed = []
    if not isinstance(listed, list):
        listed = []
    entry = {"path": artifact_file, "type": "table"}
    if entry in listed:
        return None
    return LOGGED_ARTIFACTS_TAG, json.dumps([*listed, entry])


def object_bytes(obj: object, name: str) -> tuple[str, bytes]:
    """A plain Python object as (file name, bytes) for omega|ml's ``log_artifact(obj, name)``; the suffix
    says the format and ``restore_object`` reads it back.

    - ``name.json``: dict (str keys), list, tuple, str, int, float, bool, None, nested; restored as the
      plain JSON types (a tuple comes back as a list, an int or float subclass as int or float).
    - ``name.bin``: bytes or bytearray, as they are (restored as bytes).
    - ``name.parquet`` (pyarrow installed) or ``name.csv``: a pandas DataFrame.

    Raises:
        InvalidInputError: any other object. Pickle is never used by default: restoring a pickle from a
            shared server runs whatever code it holds.
        ConfigurationError: pandas cannot write the DataFrame.
    """
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"log_artifact needs a non-empty str name for the object, got {name!r}.")
    if isinstance(obj, (bytes, bytearray)):
        return name + _BYTES, bytes(obj)
    if _is_instance(obj, "pandas", "DataFrame"):
        return _frame_bytes(obj, name)
    problem = _json_problem(obj, "obj")
    if problem is None:
        return name + _JSON, json.dumps(obj, indent=2).encode("utf-8")
    raise InvalidInputError(
        f"log_artifact cannot store {name!r}: {problem}. It stores JSON values (dict with str keys, list, "
        "str, int, float, bool, None), bytes and pandas DataFrames. Convert the object to one of them "
        "(or write it to a file and use log_artifact(local_path)); pickle is never used, because restoring "
        "a pickle from a shared server runs whatever code it holds."
    )


def restore_object(file_name: str, data: bytes) -> object:
    """The object ``object_bytes`` stored, read back by the file's suffix.

    Raises:
        InvalidInputError: a suffix other than .json/.bin/.parquet/.csv (a pickle is refused, never loaded),
            or content that is not valid for it.
        ConfigurationError: pandas (or pyarrow, for .parquet) is needed and not installed.
    """
    suffix = posixpath.splitext(file_name)[1].lower()
    if suffix == _BYTES:
        return bytes(data)
    if suffix == _JSON:
        try:
            return json.loads(data.decode("utf-8"))
        except ValueError as exc:
            raise InvalidInputError(f"restore_artifact: {file_name!r} is not valid JSON: {exc}.") from exc
    if suffix in (_PARQUET, _CSV):
        pd = _require("pandas", "pandas", f"restore_artifact of {file_name!r}")
        try:
            if suffix == _PARQUET:
                _require("pyarrow", "pyarrow", f"restore_artifact of {file_name!r} (Parquet)")
                return pd.read_parquet(io.BytesIO(data))
            return pd.read_csv(io.BytesIO(data), index_col=0)
        except (ValueError, OSError) as exc:
            raise InvalidInputError(f"restore_artifact: {file_name!r} could not be read: {exc}.") from exc
    if suffix in (".pkl", ".pickle"):
        raise InvalidInputError(
            f"restore_artifact will not load the pickle {file_name!r}: loading a pickle runs the code it "
            "holds. Download it and unpickle it yourself only if you trust who wrote it."
        )
    raise InvalidInputError(
        f"restore_artifact cannot tell the format of {file_name!r}: objects are stored with one of the "
        f"suffixes {', '.join(OBJECT_SUFFIXES)}; download other files with download_artifacts."
    )


# --- helpers -------------------------------------------------------------------------------------------


def _require(module: str, package: str, purpose: str) -> Any:
    """Import an optional library, or say which package to install for ``purpose``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigurationError(
            f"{purpose} needs {package}, which is not installed: pip install {package}"
        ) from exc


def _class(module: str, attribute: str) -> type:
    """A class of a library the caller already imported (checked by the caller)."""
    found = getattr(importlib.import_module(module), attribute)
    assert isinstance(found, type)
    return found


def _is_instance(obj: object, module: str, attribute: str) -> bool:
    """isinstance against a class of ``module`` without importing it: no object of an unimported
    library can exist."""
    loaded = sys.modules.get(module)
    cls = getattr(loaded, attribute, None) if loaded is not None else None
    return isinstance(cls, type) and isinstance(obj, cls)


def _type_name(obj: object) -> str:
    kind = type(obj)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _to_pil(image: object) -> Any:
    """A PIL image from a PIL image, an ``mlflow.Image`` or a numpy array, under MLflow's
    ``convert_to_pil_image`` rules: dtype bool, int, uint or float; shape HxW, HxWx1, HxWx3 (RGB) or
    HxWx4 (RGBA); ints must lie in [0, 255]; floats in [0, 1] are scaled by 255, floats outside it are
    min/max-rescaled first (with a warning); values are then truncated to uint8."""
    if _is_instance(image, "PIL.Image", "Image"):
        return image
    if _is_instance(image, "mlflow.tracking.multimedia", "Image"):
        return image.to_pil()  # type: ignore[attr-defined]
    if not _is_instance(image, "numpy", "ndarray"):
        raise InvalidInputError(
            f"log_image takes a numpy.ndarray, a PIL.Image.Image or an mlflow.Image, got {_type_name(image)}."
        )
    array: Any = image
    pil_image = _require("PIL.Image", "pillow", "log_image of a numpy array")
    np = importlib.import_module("numpy")
    kinds = {"b": "bool", "i": "signed integer", "u": "unsigned integer", "f": "floating"}
    if array.dtype.kind not in kinds:
        raise InvalidInputError(
            f"log_image: an array of dtype {array.dtype} is not an image; use one of "
            f"{', '.join(kinds.values())} (uint8 in [0, 255] or float in [0, 1])."
        )
    if array.ndim not in (2, 3):
        raise InvalidInputError(
            f"log_image: an array of shape {array.shape} is not an image; use HxW (grayscale) or HxWxC."
        )
    if array.ndim == 3 and array.shape[2] not in (1, 3, 4):
        raise InvalidInputError(
            f"log_image: an array of shape {array.shape} has {array.shape[2]} channels; use 1 (grayscale), "
            "3 (RGB) or 4 (RGBA)."
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    is_int = bool(np.issubdtype(array.dtype, np.integer))
    high = 255 if is_int else 1
    low_found, high_found = array.min(), array.max()
    if low_found < 0 or high_found > high:
        if is_int:
            raise InvalidInputError(
                f"log_image: integer pixel values must lie in [0, 255], found {low_found}..{high_found}; "
                "clip the array or convert it to uint8."
            )
        warnings.warn(
            "log_image: float pixel values outside [0.0, 1.0] are rescaled with min/max, as MLflow does "
            f"(found {low_found}..{high_found}).",
            stacklevel=3,
        )
        array = (array - low_found) / (high_found - low_found)
    if not is_int:
        array = array * 255
    return pil_image.fromarray(array.astype(np.uint8))


def _pil_format(artifact_file: str) -> str:
    """Pillow's format name for a file's extension, as ``Image.save(path)`` picks it."""
    pil_image = _require("PIL.Image", "pillow", "log_image")
    extension = posixpath.splitext(artifact_file)[1].lower()
    file_format: str | None = pil_image.registered_extensions().get(extension)
    if file_format is None:
        raise InvalidInputError(
            f"log_image: Pillow cannot tell an image format from {artifact_file!r}; name the file like "
            "'image.png' (or .jpg, .webp, .gif, .tiff)."
        )
    return file_format


def _pil_save(pil: Any, file_format: str, what: str) -> bytes:
    """A PIL image encoded in memory, exactly as ``Image.save(path)`` writes the file."""
    buffer = io.BytesIO()
    try:
        pil.save(buffer, format=file_format)
    except (OSError, ValueError, KeyError) as exc:  # "cannot write mode RGBA as JPEG"
        raise InvalidInputError(
            f"log_image could not write {what!r} as {file_format}: {exc}. Convert the image "
            "(image.convert('RGB')) or choose another format, such as .png."
        ) from exc
    return buffer.getvalue()


def _thumbnail(pil: Any) -> Any:
    """MLflow's ``compress_image_size``: resized so the longer side is 256 px, aspect ratio kept
    (smaller images are enlarged)."""
    width, height = pil.size
    if width > height:
        size = (_THUMBNAIL_SIZE, int(height * (_THUMBNAIL_SIZE / width)))
    else:
        size = (int(width * (_THUMBNAIL_SIZE / height)), _THUMBNAIL_SIZE)
    return pil.resize(size)


def _is_image_cell(cell: object) -> bool:
    """MLflow's ``check_is_image_object``: anything with callable save and resize and a size."""
    return (
        callable(getattr(cell, "save", None))
        and callable(getattr(cell, "resize", None))
        and hasattr(cell, "size")
    )


def _table_image_files(frame: Any, artifact_file: str) -> list[tuple[str, bytes]]:
    """Replace the image cells of ``frame`` (in place) by MLflow's references and return their files."""
    files: list[tuple[str, bytes]] = []
    table_name = posixpath.splitext(artifact_file)[0]

    def stored(cell: Any) -> dict[str, str]:
        pil = cell.to_pil() if _is_instance(cell, "mlflow.tracking.multimedia", "Image") else cell
        path = posixpath.join("table_images", table_name, str(uuid.uuid4()))
        files.append((f"{path}.png", _pil_save(pil, "PNG", artifact_file)))
        files.append((f"{path}.webp", _pil_save(_thumbnail(pil), "WEBP", artifact_file)))
        return {"type": "image", "filepath": f"{path}.png", "compressed_filepath": f"{path}.webp"}

    # MLflow looks at object columns (select_dtypes, which in pandas 3 adds str columns: they hold no image).
    for column in frame.columns:
        if frame[column].dtype != object:
            continue
        is_image = [_is_image_cell(cell) for cell in frame[column]]
        if any(is_image) and not all(is_image):
            raise InvalidInputError(
                f"log_table column {column!r} mixes images and other values; put the images in a column "
                "of their own."
            )
        if is_image and all(is_image):
            frame[column] = frame[column].map(stored)
    return files


def _read_table(pd: Any, existing: bytes, artifact_file: str) -> Any:
    """The table already stored at ``artifact_file``, read as MLflow's ``_read_from_file`` reads it."""
    try:
        if artifact_file.endswith(".json"):
            return pd.read_json(io.StringIO(existing.decode("utf-8")), orient="split")
        return pd.read_parquet(io.BytesIO(existing))
    except (ValueError, OSError) as exc:
        raise InvalidInputError(
            f"log_table cannot append to {artifact_file!r}: the stored table could not be read ({exc}); "
            "log to a new file name."
        ) from exc


def _frame_bytes(frame: Any, name: str) -> tuple[str, bytes]:
    """A DataFrame as Parquet (types and index kept) when pyarrow is installed, else CSV."""
    buffer = io.BytesIO()
    try:
        if importlib.util.find_spec("pyarrow") is not None:
            frame.to_parquet(buffer)
            return name + _PARQUET, buffer.getvalue()
        frame.to_csv(buffer)
    except (TypeError, ValueError, ImportError) as exc:
        raise InvalidInputError(
            f"log_artifact could not write the DataFrame {name!r}: {exc}. Use str column names and plain "
            "column types."
        ) from exc
    return name + _CSV, buffer.getvalue()


def _json_problem(obj: object, where: str, path: frozenset[int] = frozenset()) -> str | None:
    """Why ``obj`` is not a plain JSON value (None when it is), naming the place in the structure.
    Floats include NaN and ±inf: Python's json writes and reads them back."""
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return None
    if isinstance(obj, (list, tuple, dict)):
        if id(obj) in path:
            return f"{where} contains itself"
        inner = path | {id(obj)}
        if isinstance(obj, dict):
            for key, value in obj.items():
                if not isinstance(key, str):
                    return (
                        f"{where} has the key {key!r} ({_type_name(key)}); JSON keys are str (use str(key))"
                    )
                if (problem := _json_problem(value, f"{where}[{key!r}]", inner)) is not None:
                    return problem
            return None
        for index, item in enumerate(obj):
            if (problem := _json_problem(item, f"{where}[{index}]", inner)) is not None:
                return problem
        return None
    return f"{where} is of type {_type_name(obj)}"
