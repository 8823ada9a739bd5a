"""The MLflow pyfunc that serves a trained classifier.

Over 300 lines on purpose: it travels whole with every logged model (code_paths),
and decoding and checking each input form is one contract with the HTTP path.

It imports neither the engine, Optuna nor Hydra: a logged model carries this
package (``code_paths``) and a small weights file, and needs only torch, numpy,
Pillow and OpenCV at load.

Input, one of (docs/serving.md lists each form and what it becomes):

- a DataFrame (``dataframe_split`` / ``dataframe_records`` over HTTP) with a column
  ``image`` of encoded image files (PNG, JPEG, BMP, WebP; any size; any mode these
  decode to that has a fixed range, see ``rgb_pixels``): base64 text over HTTP, raw
  ``bytes`` too from Python; likewise a Series, a dict ``{"image": [...]}``, a list of
  files or a 1-D str/object array of them;
- raw pixels: an integer array (N, 32, 32, 3) with values 0..255 (``inputs`` over HTTP),
  of any memory layout.

Output: a DataFrame, one row per image: ``class_name``, ``class_index`` and the 10
``probabilities``. The parameter ``tta`` ("none" or a view set of ``tta.TTA_VIEWS``:
identity, flip, flip_shift, seed) averages the softmax over that set's views as
``engine.predict_logits`` does, so ``tta=flip_shift`` answers the probabilities that
eval_tta's ``test_acc_tta_flip_shift`` was measured on.

Bad input raises MlflowException(INVALID_PARAMETER_VALUE), which the scoring server
answers with HTTP 400 and the message; any other exception would become a generic
"unexpected error" without saying what was wrong. Limits (see ``Limits``) are read
from the environment when the model loads.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import reprlib
import struct
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import cv2
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from PIL import Image, ImageOps, UnidentifiedImageError

from . import hardware
from .models import ImageClassifier, build_model
from .tta import TTA_VIEWS, tta_views

WEIGHTS_ARTIFACT = "weights"
IMAGE_COLUMN = "image"
IMAGE_SIZE = 32
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
TTA_MODES = tuple(TTA_VIEWS)  # "none" and every view set, by the names eval_tta logs
ENV_PREFIX = "CIFAR_RESNET_"
# Images per forward pass, views included: bounds activation memory whatever the
# request size and view set.
_CHUNK = 128
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Limits:
    """What one request may carry; each field is overridden by $CIFAR_RESNET_<FIELD>.

    MLflow's scoring server has no body-size option, so these bound the work and the
    memory a request causes once it reaches the model: sizes are checked before any
    base64 or image decoding, pixel counts from the header before any pixel is decoded,
    and images are decoded one at a time, each shrunk to 32x32 at once.
    """

    max_image_bytes: int = 8 * 2**20  # one encoded file
    max_request_bytes: int = 32 * 2**20  # all encoded files (or pixel arrays) of a request
    max_pixels: int = 4096 * 4096  # width * height declared by one file's header
    max_images: int = 1024  # images per request: bounds inference time

    @classmethod
    def from_env(cls, environ=os.environ) -> Limits:
        values = {}
        for field in fields(cls):
            name = ENV_PREFIX + field.name.upper()
            if name in environ:
                value = environ[name].strip()
                if not value.isdigit() or int(value) == 0:
                    raise ValueError(f"{name} must be a positive integer, got {environ[name]!r}")
                values[field.name] = int(value)
        return cls(**values)


def bad_input(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def save_weights(
    path: Path, model: ImageClassifier, model_name: str, model_kwargs: dict, class_names: list[str]
) -> Path:
    """What the pyfunc needs to rebuild the network: no optimizer, no RNG state."""
    torch.save(
        {
            "model_name": model_name,
            "model_kwargs": dict(model_kwargs),
            "class_names": list(class_names),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        },
        path,
    )
    return path


def load_classifier(path: str | Path) -> tuple[ImageClassifier, list[str]]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    net = build_model(
        saved["model_name"], num_classes=len(saved["class_names"]), **saved["model_kwargs"]
    )
    # mean/std are buffers: the state dict below overwrites these placeholders.
    model = ImageClassifier(net, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved["class_names"]


# --------------------------------------------------------------------------- decoding


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 RGB -> PNG file bytes (lossless, so the model sees the same pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR, without Pillow (which refuses to open a
    zero-sized PNG at all, so could not say why)."""
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    return None


# Pillow modes whose samples are unsigned 16-bit integers: 16-bit grayscale PNGs open
# as "I;16" (Pillow >= 10.3); the others are the same data in another byte order.
_GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# 8-bit modes that Pillow converts to RGB with a defined meaning for every value.
# Those with a palette or alpha go through RGBA: Pillow applies a palette's
# transparency there (converting such an image straight to RGB makes it warn), and
# alpha is then dropped, as for RGBA files.
_VIA_RGBA_MODES = ("LA", "P", "PA", "RGBA")
_VIA_RGB_MODES = ("1", "L", "RGB", "RGBX", "CMYK", "YCbCr")
ACCEPTED_MODES = _VIA_RGB_MODES + _VIA_RGBA_MODES + _GREY16_MODES
# Refused rather than converted: "I" and "F" have no range to scale from, and Pillow's
# convert() would clip them (as it turns a 16-bit 50% grey white); no PNG, JPEG, BMP or
# WebP decodes to the others, so a conversion of them could never be checked on a file.
_NOT_FROM_OUR_FORMATS = "which no PNG, JPEG, BMP or WebP decodes to"
_REFUSED_MODES = {
    "I": "32-bit signed integers, with no fixed range to scale to 0..255",
    "F": "32-bit floats, whose range (0..1, 0..255 or other) the file does not say",
    "La": f"premultiplied alpha, {_NOT_FROM_OUR_FORMATS}",
    "RGBa": f"premultiplied alpha, {_NOT_FROM_OUR_FORMATS}",
    "LAB": f"CIELAB, {_NOT_FROM_OUR_FORMATS}",
    "HSV": f"hue, saturation, value, {_NOT_FROM_OUR_FORMATS}",
}


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """A decoded Pillow image -> (H, W, 3) uint8 RGB, every mode scaled to 0..255.

    8-bit modes convert as Pillow defines them (1-bit: 0 or 255; palette: its colours;
    CMYK and YCbCr: Pillow's colour conversion); alpha is dropped, not composited.
    16-bit grey ("I;16", "I;16B", ...) becomes round(value / 257), so 0..65535 maps
    onto 0..255 and 257*k onto k exactly. (16-bit colour and grey+alpha PNGs arrive
    from Pillow already as 8-bit RGB(A), value // 256: within 1 level of value / 257.)

    Raises ValueError naming the mode for every other mode ("I", "F", signed or 32-bit
    integer modes, "La", "RGBa", "LAB", "HSV"): none of PNG, JPEG, BMP or WebP decodes
    to them with Pillow >= 10.3, and converting them would need a range they lack.
    """
    mode = image.mode
    if mode in _GREY16_MODES:
        values = np.asarray(image).astype(np.uint32)  # any byte order -> native
        grey = ((2 * values + 257) // 514).astype(np.uint8)  # round(values / 257)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in _VIA_RGBA_MODES:
        return np.asarray(image.convert("RGBA"))[..., :3]
    if mode in _VIA_RGB_MODES:
        return np.asarray(image if mode == "RGB" else image.convert("RGB"))
    raise ValueError(_mode_refusal(mode))


def _mode_refusal(mode: str) -> str:
    why = _REFUSED_MODES.get(mode) or (
        f"integers of another width or sign, {_NOT_FROM_OUR_FORMATS}"
        if mode.startswith("I;")
        else "unknown to this model"
    )
    return (
        f"has image mode {mode!r} ({why}); accepted modes: "
        f"{', '.join(_VIA_RGB_MODES + _VIA_RGBA_MODES)} and 16-bit grey "
        f"({', '.join(_GREY16_MODES)})"
    )


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """One encoded image file -> (32, 32, 3) uint8 RGB (see ``rgb_pixels`` for how each
    image mode becomes RGB). Raises ValueError saying what is wrong with the file: not
    an image of the four formats, a zero or over-``max_pixels`` size, a mode that has no
    fixed range, corrupt or truncated pixel data."""
    if len(data) == 0:
        raise ValueError("is empty")
    try:
        # open() only reads the header: the size is known before any pixel is decoded.
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:  # Pillow's own guard, far above ours
        raise ValueError(
            f"is too large ({error}); the limit is {max_pixels:,} pixels ({ENV_PREFIX}MAX_PIXELS)"
        ) from None
    except UnidentifiedImageError:
        size = _png_size(data)
        if size is not None and 0 in size:
            raise ValueError(f"is a PNG with a zero dimension ({size[0]}x{size[1]})") from None
        raise ValueError(
            "is not a valid PNG, JPEG, BMP or WebP image (unknown format or corrupt header)"
        ) from None
    except Exception as error:  # noqa: BLE001 - whatever fails on a client's file is its fault
        raise ValueError(f"has an unreadable header: {type(error).__name__}: {error}") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ValueError(
                f"is {width}x{height} = {width * height:,} pixels, over the limit "
                f"of {max_pixels:,} ({ENV_PREFIX}MAX_PIXELS)"
            )
        if image.mode not in ACCEPTED_MODES:  # known from the header: refused undecoded
            raise ValueError(_mode_refusal(image.mode))
        try:
            # Phone photos store their rotation in EXIF; undo it as an image viewer would.
            pixels = rgb_pixels(ImageOps.exif_transpose(image))
        except Exception as error:  # noqa: BLE001 - truncated or corrupt pixel data
            raise ValueError(f"could not be decoded: {type(error).__name__}: {error}") from None
    if pixels.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        pixels = cv2.resize(pixels, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA)
    return pixels


def _file_bytes(cell, index: int, limits: Limits) -> bytes:
    """The encoded file in one cell: base64 text (an optional data: URL prefix and
    line breaks allowed) or raw bytes."""
    if cell is None or cell is pd.NA or (isinstance(cell, float) and np.isnan(cell)):
        raise bad_input(f"image {index}: is missing (null)")  # pandas turns None into NaN
    if isinstance(cell, (bytes, bytearray, memoryview)):
        data = bytes(cell)
    elif isinstance(cell, str):
        text = cell.partition(",")[2] if cell.startswith("data:") else cell
        text = "".join(text.split())  # `base64` wraps its output at 76 columns
        if len(text) // 4 * 3 > limits.max_image_bytes:  # checked before decoding
            raise bad_input(
                f"image {index}: about {len(text) // 4 * 3:,} bytes, over the "
                f"limit of {limits.max_image_bytes:,} ({ENV_PREFIX}MAX_IMAGE_BYTES)"
            )
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as error:
            raise bad_input(f"image {index}: not valid base64 ({error})") from None
    else:
        raise bad_input(
            f"image {index}: expected a base64-encoded image file, got "
            f"{type(cell).__name__} {reprlib.repr(cell)}"
        )
    if len(data) > limits.max_image_bytes:
        raise bad_input(
            f"image {index}: {len(data):,} bytes, over the limit of "
            f"{limits.max_image_bytes:,} ({ENV_PREFIX}MAX_IMAGE_BYTES)"
        )
    return data


def _encoded_size(cell) -> int:
    if isinstance(cell, str):
        return len(cell) // 4 * 3
    if isinstance(cell, memoryview):
        return cell.nbytes  # len() counts items, which need not be bytes
    return len(cell) if isinstance(cell, (bytes, bytearray)) else 0


def decode_files(cells: list, limits: Limits) -> np.ndarray:
    """A column of encoded files (each cell base64 ``str`` or raw ``bytes``/``bytearray``/
    ``memoryview``) -> (N, 32, 32, 3) uint8, N = len(cells). Raises a 400-style
    MlflowException naming the first bad cell ("image <i>: ..."), or the count or size
    over ``limits``."""
    _check_count(len(cells), limits)
    total = sum(_encoded_size(cell) for cell in cells)
    if total > limits.max_request_bytes:
        raise bad_input(
            f"the request carries about {total:,} bytes of images, over the limit "
            f"of {limits.max_request_bytes:,} ({ENV_PREFIX}MAX_REQUEST_BYTES)"
        )
    images = np.empty((len(cells), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for index, cell in enumerate(cells):
        try:
            images[index] = decode_image(_file_bytes(cell, index, limits), limits.max_pixels)
        except ValueError as error:
            raise bad_input(f"image {index}: {error}") from None
    return images


_PIXELS_SHAPE = f"(N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3)"


def pixel_array(array: np.ndarray, limits: Limits) -> np.ndarray:
    """Raw pixels (N, 32, 32, 3) as sent -> a new C-contiguous, writable uint8 array.

    Any integer dtype (any byte order) passes when every value is in 0..255, since JSON
    has no uint8; any memory layout (Fortran order, strided or reversed slices) passes,
    as a copy. Refused with a 400-style MlflowException: another shape, bool, float,
    complex, object or other dtypes, values outside 0..255, and N over ``limits``.
    The byte limit counts N x 3072, the uint8 size, whatever dtype the pixels came in,
    so that int64 pixels from JSON and uint8 ones from Python meet the same limit.
    """
    if array.ndim != 4 or array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise bad_input(
            f"expected image arrays of shape {_PIXELS_SHAPE} (uint8 RGB) or a column "
            f"{IMAGE_COLUMN!r} of encoded images; got an array of shape {array.shape}"
        )
    _check_count(len(array), limits)
    size = len(array) * IMAGE_SIZE * IMAGE_SIZE * 3
    if size > limits.max_request_bytes:
        raise bad_input(
            f"the request carries {size:,} bytes of pixels, over the limit "
            f"of {limits.max_request_bytes:,} ({ENV_PREFIX}MAX_REQUEST_BYTES)"
        )
    if array.dtype.kind not in "iu":
        raise bad_input(f"expected uint8 pixels (integers 0..255); got dtype {array.dtype}")
    if array.dtype != np.uint8:
        low, high = array.min(), array.max()
        if low < 0 or high > 255:
            raise bad_input(f"pixel values must be in 0..255; got {low}..{high}")
    # A copy: torch.from_numpy refuses negative strides and warns on read-only arrays,
    # and the caller's array must not be touched. 3 KB an image.
    return np.array(array, dtype=np.uint8, order="C")


def _check_count(count: int, limits: Limits) -> None:
    if count == 0:
        raise bad_input("the request holds no images")
    if count > limits.max_images:
        raise bad_input(
            f"the request holds {count:,} images, over the limit of "
            f"{limits.max_images:,} ({ENV_PREFIX}MAX_IMAGES); split it"
        )


_FILE_TYPES = (str, bytes, bytearray, memoryview)
_FORMS = (
    f"a DataFrame with a column {IMAGE_COLUMN!r} of image files, a dict "
    f"{{{IMAGE_COLUMN!r}: [files]}}, a list of files, or integer pixels {_PIXELS_SHAPE}"
)


def _file_cells(values, where: str) -> list:
    """The cells of a column of files given as a list, Series or 1-D array."""
    if isinstance(values, _FILE_TYPES):
        return [values]  # one file
    if isinstance(values, (list, tuple)):
        return list(values)
    if isinstance(values, pd.Series):
        return values.tolist()
    if isinstance(values, np.ndarray):
        if values.dtype.kind == "S":
            # numpy pads bytes items with NULs and strips every trailing NUL on reading,
            # so a file that ends in 0 (a BMP's row padding) comes back truncated.
            raise bad_input(
                f"{where} is a numpy bytes array (dtype {values.dtype}), which "
                "drops each file's trailing zero bytes; pass a list or an "
                "object array of bytes"
            )
        if values.ndim <= 1 and values.dtype.kind in "UO":
            return np.atleast_1d(values).tolist()
        raise bad_input(
            f"{where} must be a 1-D array of image files (str or object "
            f"dtype); got an array of dtype {values.dtype} and shape {values.shape}"
        )
    raise bad_input(f"{where} must be a list of image files; got {type(values).__name__}")


def to_images(model_input, limits: Limits) -> np.ndarray:
    """Whatever predict was given -> (N, 32, 32, 3) uint8, C-contiguous.

    Files (base64 ``str`` or raw ``bytes``), decoded by ``decode_files``: a DataFrame's
    column ``image``, a Series, a dict's key ``image`` (list, tuple, Series, 1-D str or
    object array, or one file), a list or tuple of files, a 1-D str or object array.
    Pixels, checked by ``pixel_array``: an integer ndarray (N, 32, 32, 3), or nested
    lists / a list of (32, 32, 3) arrays that numpy stacks into one.
    Anything else, and numpy bytes (``S``) arrays, which have lost trailing zero bytes,
    raise a 400-style MlflowException (INVALID_PARAMETER_VALUE) saying what was wrong.
    """
    if isinstance(model_input, pd.DataFrame):
        columns = [str(c) for c in model_input.columns]
        if IMAGE_COLUMN not in columns:
            raise bad_input(
                f"expected a column {IMAGE_COLUMN!r} of base64-encoded image files; "
                f"got columns {columns}"
            )
        if columns.count(IMAGE_COLUMN) > 1:  # df[name] would be a DataFrame, not a column
            raise bad_input(
                f"the column {IMAGE_COLUMN!r} appears {columns.count(IMAGE_COLUMN)} "
                "times; send it once"
            )
        return decode_files(model_input[IMAGE_COLUMN].tolist(), limits)
    if isinstance(model_input, pd.Series):
        return decode_files(model_input.tolist(), limits)
    if isinstance(model_input, dict):  # {"inputs": {"image": [...]}} over HTTP
        if IMAGE_COLUMN not in model_input:
            raise bad_input(
                f"expected a key {IMAGE_COLUMN!r} of base64-encoded image files; "
                f"got keys {[str(k) for k in model_input]}"
            )
        return decode_files(_file_cells(model_input[IMAGE_COLUMN], f"{IMAGE_COLUMN!r}"), limits)
    if isinstance(model_input, (list, tuple)):
        _check_count(len(model_input), limits)  # files or images: one item each
        # np.asarray would turn a list of bytes into an S array, losing trailing zeros.
        if any(isinstance(cell, _FILE_TYPES) for cell in model_input):
            return decode_files(list(model_input), limits)
        try:
            model_input = np.asarray(model_input)
        except (ValueError, TypeError) as error:  # ragged nesting, unconvertible items
            raise bad_input(
                f"expected {_FORMS}; got a list numpy cannot make an array of ({error})"
            ) from None
    if not isinstance(model_input, np.ndarray):
        raise bad_input(f"expected {_FORMS}; got {type(model_input).__name__}")
    if model_input.ndim <= 1 and model_input.dtype.kind in "USO":  # {"inputs": ["<b64>", ...]}
        return decode_files(_file_cells(model_input, "the input"), limits)
    return pixel_array(model_input, limits)


# --------------------------------------------------------------------------- the pyfunc


_TYPE_HINT_WARNING = "Add type hints to the `predict` method"


class _PythonModelWithoutHintWarning(mlflow.pyfunc.PythonModel):
    """A PythonModel whose subclasses are created without MLflow's warning
    "Add type hints to the `predict` method", which otherwise prints at every import.

    Why not a type hint: predict takes a DataFrame, a dict, a list or an ndarray, and
    MLflow 3.17.2 has no hint for that. ``Any`` or a Union of those draws two other
    warnings ("Type hints must be wrapped in list[...]" at class creation, "Failed to
    infer signature from type hint" at logging) and changes nothing else: tried, the
    logged model kept no input schema and took both DataFrames and arrays as before.
    ``pd.DataFrame`` or ``np.ndarray``, the only hints MLflow takes silently, would
    misstate the input. Why not a warnings filter: MLflow's check runs under its own
    ``simplefilter("once")``, which outranks any filter set around it; so the warnings
    of class creation are recorded, and every one but this is issued again.
    """

    def __init_subclass__(cls, **kwargs) -> None:
        with warnings.catch_warnings(record=True) as caught:
            super().__init_subclass__(**kwargs)
        for warning in caught:
            if _TYPE_HINT_WARNING not in str(warning.message):
                warnings.warn_explicit(
                    warning.message, warning.category, warning.filename, warning.lineno
                )


class CifarClassifier(_PythonModelWithoutHintWarning):
    """Encoded image files or uint8 pixels in; class name, index and probabilities out.
    Logged as a model from code (``serving_model.py``), not pickled."""

    def load_context(self, context) -> None:
        self.limits = Limits.from_env()
        self.model, self.class_names = load_classifier(context.artifacts[WEIGHTS_ARTIFACT])
        # The machine decides, as for training and eval_tta (hardware.py): on the same
        # machine a served tta=<set> is then exactly what eval_tta averaged.
        # $CIFAR_RESNET_DEVICE / $CIFAR_RESNET_PRECISION override "auto".
        self.device = hardware.resolve_device(os.environ.get(ENV_PREFIX + "DEVICE", "auto"))
        hardware.configure_threads()
        requested = os.environ.get(ENV_PREFIX + "PRECISION", "auto")
        self.precision = hardware.resolve_precision(requested, self.device)
        self.amp_dtype = hardware.autocast_dtype(self.precision)
        self.model.to(self.device)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        """Any input form ``to_images`` takes -> a DataFrame of N rows: ``class_name``
        (str), ``class_index`` (int64) and ``probabilities`` (list of 10 floats, the
        softmax in class order). ``params["tta"]``: "none" (default) or a view set name
        (``TTA_MODES``). Raises a 400-style MlflowException (INVALID_PARAMETER_VALUE)
        for bad input, an unknown ``tta`` included."""
        tta = (params or {}).get("tta") or "none"
        if tta not in TTA_MODES:
            raise bad_input(f"unknown tta {tta!r}; choose one of {', '.join(TTA_MODES)}")
        images = to_images(model_input, self.limits)
        probabilities = self.probabilities(images, tta)
        indices = probabilities.argmax(1)
        return pd.DataFrame(
            {
                "class_name": [self.class_names[i] for i in indices],
                "class_index": indices.astype(np.int64),
                "probabilities": probabilities.tolist(),
            }
        )

    @torch.inference_mode()
    def probabilities(self, images: np.ndarray, tta: str = "none") -> np.ndarray:
        """(N, 32, 32, 3) uint8 -> (N, classes) float32: the softmax averaged over the
        views of the set ``tta`` ("none": the plain softmax), computed as
        ``engine.predict_logits(..., views=tta_views(tta))`` computes it, in the
        precision ``hardware`` resolved at load (float32 out).
        Raises ValueError for an unknown ``tta``."""
        views = tta_views(tta)
        step = max(1, _CHUNK // len(views))
        out = []
        for start in range(0, len(images), step):
            x = torch.from_numpy(images[start : start + step]).permute(0, 3, 1, 2).to(self.device)
            x = x.contiguous(memory_format=torch.channels_last)
            # As engine.predict_logits: all views in one forward pass, softmax averaged
            # over them (not the logits), so eval_tta measured exactly this answer.
            with torch.autocast(
                self.device.type,
                dtype=self.amp_dtype or torch.float32,
                enabled=self.amp_dtype is not None,
            ):
                logits = self.model(torch.cat([view(x) for view in views]))
            probs = logits.float().softmax(1)
            out.append(probs.view(len(views), len(x), -1).mean(0).cpu())
        return torch.cat(out).numpy()
