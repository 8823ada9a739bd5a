"""The served classifier: the pyfunc's decoding and validation (fast, no server), then
a real `mlflow models serve` of a registered model, as users run it (slow)."""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from cifar_resnet import serving, tracking
from cifar_resnet.models import ImageClassifier, build_model
from cifar_resnet.serving import Limits, decode_image, to_images

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MODEL_NAME = "cifar10-resnet-test"
# The server runs with small limits, so that requests over them stay small too.
SERVER_LIMITS = {"CIFAR_RESNET_MAX_IMAGE_BYTES": "200000",
                 "CIFAR_RESNET_MAX_REQUEST_BYTES": "1000000",
                 "CIFAR_RESNET_MAX_IMAGES": "64"}


# --------------------------------------------------------------------------- images


@functools.lru_cache(maxsize=1)
def _cifar_test_batch() -> np.ndarray:
    from cifar_resnet import data

    return data.load_cifar10(os.environ["CIFAR10_ROOT"], train=False)[0]


def sample_images(count: int) -> np.ndarray:
    """The first CIFAR-10 test images when CIFAR10_ROOT is set, else smooth synthetic ones."""
    if os.environ.get("CIFAR10_ROOT"):
        return _cifar_test_batch()[:count].copy()
    y, x = np.mgrid[0:32, 0:32]
    return np.stack([np.stack([(8 * y + 17 * i) % 256, (8 * x + 31 * i) % 256,
                               (255 - 4 * (x + y) + 7 * i) % 256], -1)
                     for i in range(count)]).astype(np.uint8)


def encode(image: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Incompressible pixels: the PNG is about height * width * channels bytes."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def crafted_png(width: int, height: int, idat: bytes) -> bytes:
    """A PNG whose header claims width x height, whatever the pixel data holds."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# 10 MB of zeros compress to ~10 KB: a few-KB file that claims 7.5 GB of pixels.
BOMB = crafted_png(50000, 50000, zlib.compress(bytes(10_000_000), 9))
TRUNCATED_PNG = encode(noise(64, 64))[:2000]
RGBA_200x150 = noise(150, 200, 4, seed=1)


def frame(files: list[bytes]) -> pd.DataFrame:
    return pd.DataFrame({"image": [b64(f) for f in files]})


# --------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def torch_model() -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(build_model("resnet_small"), CIFAR_MEAN, CIFAR_STD).eval()


@pytest.fixture(scope="module")
def weights(torch_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "weights.pt"
    return serving.save_weights(path, torch_model, "resnet_small", {}, CLASSES)


@pytest.fixture(scope="module")
def classifier(weights) -> serving.CifarClassifier:
    model = serving.CifarClassifier()
    model.load_context(SimpleNamespace(artifacts={serving.WEIGHTS_ARTIFACT: str(weights)}))
    return model


def torch_probabilities(model: ImageClassifier, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images).permute(0, 3, 1, 2)).softmax(1).numpy()


def assert_rejected(call, *fragments: str) -> None:
    """``call`` raises what the scoring server turns into HTTP 400, with the reason."""
    with pytest.raises(MlflowException) as caught:
        call()
    assert caught.value.get_http_status_code() == 400
    for fragment in fragments:
        assert fragment in caught.value.message


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("fmt, options, tolerance", [
    ("PNG", {}, 0), ("BMP", {}, 0), ("WEBP", {"lossless": True}, 0),
    ("JPEG", {"quality": 95}, 12), ("WEBP", {"quality": 90}, 25),
])
def test_each_format_decodes_to_the_pixels_it_holds(fmt, options, tolerance):
    image = sample_images(1)[0]
    decoded = decode_image(encode(image, fmt, **options), max_pixels=10_000)
    assert decoded.dtype == np.uint8 and decoded.shape == (32, 32, 3)
    assert np.abs(decoded.astype(int) - image).mean() <= tolerance


def test_grayscale_and_rgba_become_rgb():
    gray = sample_images(1)[0][..., 0]
    assert np.array_equal(decode_image(encode(gray), 10_000), np.stack([gray] * 3, -1))
    rgba = noise(32, 32, 4)
    assert np.array_equal(decode_image(encode(rgba), 10_000), rgba[..., :3])


def test_other_sizes_are_resized_with_area_interpolation():
    expected = cv2.resize(RGBA_200x150[..., :3], (32, 32), interpolation=cv2.INTER_AREA)
    assert np.array_equal(decode_image(encode(RGBA_200x150), 100_000), expected)


@pytest.mark.parametrize("data, reason", [
    (b"this is not an image at all", "not a valid PNG, JPEG, BMP or WebP image"),
    (TRUNCATED_PNG, "could not be decoded"),
    (b"", "is empty"),
    (crafted_png(0, 32, zlib.compress(b"")), "zero dimension (0x32)"),
    (crafted_png(32, 0, zlib.compress(b"")), "zero dimension (32x0)"),
    (encode(noise(32, 32), "GIF"), "not a valid PNG, JPEG, BMP or WebP image"),
])
def test_bad_files_say_what_is_wrong(data, reason):
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        decode_image(data, max_pixels=10_000)


@pytest.mark.parametrize("width, height, reason", [
    (50000, 50000, "is too large"),  # Pillow's own guard, inside open()
    (5000, 4000, "5000x4000 = 20,000,000 pixels, over the limit of 16,777,216"),  # ours
])
def test_oversized_images_are_refused_from_the_header_before_decoding(width, height, reason):
    # The pixel data is not even valid zlib: refusing it says "pixels", not "could not
    # be decoded", only because nothing was decoded.
    bomb = crafted_png(width, height, b"\x00not zlib" * 100)
    started = time.perf_counter()
    with pytest.raises(ValueError, match=reason) as caught:
        decode_image(bomb, max_pixels=Limits().max_pixels)
    assert "MAX_PIXELS" in str(caught.value)
    assert time.perf_counter() - started < 1.0


def test_every_input_form_gives_the_same_pixels():
    images = sample_images(3)
    files = [encode(image) for image in images]
    limits = Limits()
    forms = [
        frame(files),
        pd.DataFrame({"image": files}),  # raw bytes, from Python
        pd.DataFrame({"image": [f"data:image/png;base64,{b64(f)}" for f in files]}),
        pd.DataFrame({"image": [base64.encodebytes(f).decode() for f in files]}),  # wrapped lines
        {"image": np.array([b64(f) for f in files])},  # {"inputs": {"image": [...]}}
        np.array([b64(f) for f in files]),  # {"inputs": ["...", ...]}
        images,
        images.astype(np.int64),  # what JSON "inputs" arrive as
    ]
    for form in forms:
        assert np.array_equal(to_images(form, limits), images)


@pytest.mark.parametrize("model_input, fragments", [
    (pd.DataFrame({"imgae": ["x"]}), ["expected a column 'image'", "got columns ['imgae']"]),
    (pd.DataFrame({"images": ["x"]}), ["expected a column 'image'"]),
    ({"picture": ["x"]}, ["expected a key 'image'"]),
    (pd.DataFrame({"image": ["!!not base64!!"]}), ["image 0", "not valid base64"]),
    (pd.DataFrame({"image": [b64(encode(sample_images(1)[0])), None]}),
     ["image 1: is missing (null)"]),
    (pd.DataFrame({"image": [12345]}), ["image 0: expected a base64-encoded image file, got int"]),
    (pd.DataFrame({"image": [""]}), ["image 0", "is empty"]),
    (pd.DataFrame({"image": []}), ["no images"]),
    (sample_images(2).astype(np.float32), ["expected uint8 pixels", "float32"]),
    (sample_images(2).astype(bool), ["expected uint8 pixels", "bool"]),
    (sample_images(2).transpose(0, 3, 1, 2), ["shape (N, 32, 32, 3)", "(2, 3, 32, 32)"]),
    (sample_images(2)[0], ["shape (N, 32, 32, 3)", "(32, 32, 3)"]),
    (sample_images(2).astype(np.int64) * 2, ["0..255"]),
])
def test_bad_tables_and_arrays_say_what_is_wrong(model_input, fragments):
    assert_rejected(lambda: to_images(model_input, Limits()), *fragments)


def test_limits_are_checked_before_decoding():
    small, big = encode(noise(8, 8)), encode(noise(40, 40))  # ~0.3 KB and ~4.9 KB
    limits = Limits(max_image_bytes=2000, max_request_bytes=6000, max_images=4)
    # A valid base64 text of garbage: rejected by its length alone, never decoded.
    assert_rejected(lambda: to_images(frame([small, b"x" * 4000]), limits),
                    "image 1", "over the limit of 2,000 (CIFAR_RESNET_MAX_IMAGE_BYTES)")
    assert_rejected(lambda: to_images(pd.DataFrame({"image": [big]}), limits),
                    "image 0", "CIFAR_RESNET_MAX_IMAGE_BYTES")
    assert_rejected(lambda: to_images(frame([small] * 4 + [b"x" * 1900] * 2), limits),
                    "over the limit of 4 (CIFAR_RESNET_MAX_IMAGES)")
    assert_rejected(lambda: to_images(frame([b"x" * 1900] * 4), limits),
                    "over the limit of 6,000 (CIFAR_RESNET_MAX_REQUEST_BYTES)")
    assert_rejected(lambda: to_images(noise(32, 32)[None].repeat(5, 0), limits),
                    "CIFAR_RESNET_MAX_IMAGES")
    assert len(to_images(frame([small] * 4), limits)) == 4


def test_limits_come_from_the_environment():
    limits = Limits.from_env({"CIFAR_RESNET_MAX_PIXELS": "1000", "CIFAR_RESNET_MAX_IMAGES": "7"})
    assert (limits.max_pixels, limits.max_images) == (1000, 7)
    assert limits.max_image_bytes == Limits().max_image_bytes
    for bad in ("0", "-5", "lots"):
        with pytest.raises(ValueError, match="CIFAR_RESNET_MAX_IMAGE_BYTES must be a positive"):
            Limits.from_env({"CIFAR_RESNET_MAX_IMAGE_BYTES": bad})


# --------------------------------------------------------------------------- predict


def test_predict_answers_what_the_torch_model_does(classifier, torch_model):
    images = sample_images(8)
    answer = classifier.predict(None, frame([encode(image) for image in images]))
    assert list(answer.columns) == ["class_name", "class_index", "probabilities"]
    probabilities = np.array(answer["probabilities"].tolist())
    np.testing.assert_allclose(probabilities, torch_probabilities(torch_model, images),
                               rtol=1e-5, atol=1e-6)
    assert np.array_equal(answer["class_index"], probabilities.argmax(1))
    assert list(answer["class_name"]) == [CLASSES[i] for i in answer["class_index"]]
    np.testing.assert_allclose(probabilities.sum(1), 1, rtol=1e-5)


def test_tta_flip_averages_the_image_and_its_mirror(classifier, torch_model):
    images = sample_images(4)
    flipped = classifier.predict(None, images, params={"tta": "flip"})
    expected = (torch_probabilities(torch_model, images)
                + torch_probabilities(torch_model, images[:, :, ::-1].copy())) / 2
    np.testing.assert_allclose(np.array(flipped["probabilities"].tolist()), expected,
                               rtol=1e-5, atol=1e-6)
    assert_rejected(lambda: classifier.predict(None, images, params={"tta": "rotate"}),
                    "unknown tta 'rotate'", "none, flip")


# --------------------------------------------------------------------------- served


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(torch_model, weights, tmp_path_factory):
    """A throw-away tracking store holding MODEL_NAME version 1, alias champion."""
    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient()
        experiment = client.create_experiment("serving", artifact_location=(tmp / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = tracking.log_classifier(weights, sample_images(2))
        version = tracking.register_model(info.model_uri, MODEL_NAME, {"model": "resnet_small"})
        client.set_registered_model_alias(MODEL_NAME, "champion", version.version)
        yield SimpleNamespace(uri=uri, version=version.version,
                              pyfunc=mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion"))
    finally:
        mlflow.set_tracking_uri(previous)


def start_server(model_uri: str, tracking_uri: str, log: Path, extra_env=None):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, **(extra_env or {}),
           # `--env-manager local` runs the first python/uvicorn on PATH: the venv's.
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port)],
            env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return process, url
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    stop_server(process)
    pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM to the whole group (mlflow and its uvicorn), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    process, url = start_server(f"models:/{MODEL_NAME}@champion", registry.uri, log, SERVER_LIMITS)
    yield url
    stop_server(process)


def invoke(url: str, body, timeout: float = 60) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(f"{url}/invocations", data=data, timeout=timeout,
                         headers={"Content-Type": "application/json"})


def split_body(files: list[bytes], **params) -> dict:
    body = {"dataframe_split": {"columns": ["image"], "data": [[b64(f)] for f in files]}}
    return {**body, "params": params} if params else body


def predictions(response: requests.Response) -> pd.DataFrame:
    assert response.status_code == 200, response.text[-2000:]
    return pd.DataFrame(response.json()["predictions"])


def assert_same_answer(served: pd.DataFrame, local: pd.DataFrame) -> None:
    assert list(served["class_name"]) == list(local["class_name"])
    assert list(served["class_index"]) == list(local["class_index"])
    np.testing.assert_allclose(np.array(served["probabilities"].tolist()),
                               np.array(local["probabilities"].tolist()), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_served_pngs_match_the_pyfunc_and_the_checkpoint(server, registry, torch_model):
    images = sample_images(32)
    files = [encode(image) for image in images]
    served = predictions(invoke(server, split_body(files)))
    assert_same_answer(served, registry.pyfunc.predict(frame(files)))
    np.testing.assert_allclose(np.array(served["probabilities"].tolist()),
                               torch_probabilities(torch_model, images), rtol=1e-4, atol=1e-6)
    assert np.array_equal(served["class_index"], torch_probabilities(torch_model, images).argmax(1))


@pytest.mark.slow
def test_records_jpeg_large_rgba_and_pixel_arrays_are_served(server, registry):
    images = sample_images(4)
    files = [encode(images[0]), encode(images[1], "JPEG", quality=90),
             encode(images[2], "WEBP"), encode(RGBA_200x150), encode(images[3][..., 0])]
    served = predictions(invoke(server, {"dataframe_records": [{"image": b64(f)} for f in files]}))
    assert_same_answer(served, registry.pyfunc.predict(frame(files)))
    assert set(served["class_name"]) <= set(CLASSES) and len(served) == len(files)

    arrays = predictions(invoke(server, {"inputs": images.tolist()}))
    assert_same_answer(arrays, registry.pyfunc.predict(images))
    # Raw pixels and their PNGs are the same images.
    assert_same_answer(arrays, predictions(invoke(server, split_body([encode(i) for i in images]))))


@pytest.mark.slow
def test_tta_parameter_over_http(server, registry):
    files = [encode(image) for image in sample_images(4)]
    flipped = predictions(invoke(server, split_body(files, tta="flip")))
    assert_same_answer(flipped, registry.pyfunc.predict(frame(files), params={"tta": "flip"}))
    plain = predictions(invoke(server, split_body(files)))
    assert not np.allclose(np.array(flipped["probabilities"].tolist()),
                           np.array(plain["probabilities"].tolist()))


def _split(cells) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[c] for c in cells]}}


GOOD = b64(encode(sample_images(1)[0]))
BAD_REQUESTS = {
    "not an image": (_split([b64(b"GIF89a? no, just text")]), "not a valid PNG, JPEG, BMP or WebP"),
    "truncated png": (_split([GOOD, b64(TRUNCATED_PNG)]), "image 1: could not be decoded"),
    "empty string": (_split([""]), "image 0: is empty"),
    "null": (_split([None]), "image 0: is missing (null)"),
    "not base64": (_split(["%%%%"]), "not valid base64"),
    "missing column": ({"dataframe_records": [{"file": GOOD}]}, "expected a column 'image'"),
    "misspelt column": ({"dataframe_split": {"columns": ["imgae"], "data": [[GOOD]]}},
                        "got columns ['imgae']"),
    "float arrays": ({"inputs": (sample_images(2) / 255).tolist()}, "expected uint8 pixels"),
    "channels-first arrays": ({"inputs": sample_images(2).transpose(0, 3, 1, 2).tolist()},
                              "(2, 3, 32, 32)"),
    "ragged arrays": ({"inputs": [[[1, 2, 3]], [[1, 2]]]}, "inhomogeneous"),
    "zero dimension": (_split([b64(crafted_png(0, 32, zlib.compress(b"")))]), "zero dimension"),
    "decompression bomb": (_split([b64(BOMB)]), "is too large"),
    "image over the byte limit": (_split([b64(encode(noise(300, 300)))]),
                                  "CIFAR_RESNET_MAX_IMAGE_BYTES"),
    "request over the byte limit": (_split([b64(encode(noise(250, 250, seed=i))) for i in range(6)]),
                                    "over the limit of 1,000,000 (CIFAR_RESNET_MAX_REQUEST_BYTES)"),
    "too many images": (_split([GOOD] * 65), "over the limit of 64 (CIFAR_RESNET_MAX_IMAGES)"),
    "unknown tta": ({**_split([GOOD]), "params": {"tta": "spin"}}, "unknown tta 'spin'"),
    "tta of the wrong type": ({**_split([GOOD]), "params": {"tta": 3}}, "tta"),
    "no input field": ({"images": [GOOD]}, "exactly one of the input fields"),
    "not json": ("{this is not json", "valid JSON"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_400_with_the_reason_and_the_server_keeps_serving(server, case):
    body, reason = BAD_REQUESTS[case]
    started = time.monotonic()
    response = invoke(server, body, timeout=30)
    assert response.status_code == 400, response.text[-1000:]
    assert reason in response.json()["message"]
    assert time.monotonic() - started < 10
    assert requests.get(f"{server}/ping", timeout=5).status_code == 200


@pytest.mark.slow
def test_after_bad_input_answers_are_unchanged(server, registry):
    files = [encode(image) for image in sample_images(3)]
    assert_same_answer(predictions(invoke(server, split_body(files))),
                       registry.pyfunc.predict(frame(files)))
    response = requests.post(f"{server}/invocations", data="image\nabc", timeout=10,
                             headers={"Content-Type": "text/plain"})
    assert response.status_code == 415


@pytest.mark.slow
def test_client_prints_class_and_confidence_and_names_rejected_files(server, registry, tmp_path):
    images = sample_images(3)
    for index, image in enumerate(images):
        (tmp_path / f"img{index}.png").write_bytes(encode(image))
    (tmp_path / "broken.png").write_bytes(TRUNCATED_PNG)
    (tmp_path / "notes.txt").write_text("not an image, and not picked from a folder")
    result = subprocess.run([sys.executable, "-m", "cifar_resnet.client", server, str(tmp_path),
                             "--batch-size", "2"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    expected = registry.pyfunc.predict(images)
    lines = sorted(line.split("\t") for line in result.stdout.splitlines())
    assert [line[0] for line in lines] == [str(tmp_path / f"img{i}.png") for i in range(3)]
    for (_, name, confidence), (_, row) in zip(lines, expected.iterrows()):
        assert name == row["class_name"]
        assert float(confidence) == pytest.approx(max(row["probabilities"]), abs=1e-4)
    assert f"{tmp_path / 'broken.png'}\terror: could not be decoded" in result.stderr


def test_client_says_when_the_server_is_unreachable(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(sample_images(1)[0]))
    result = subprocess.run([sys.executable, "-m", "cifar_resnet.client",
                             f"http://127.0.0.1:{free_port()}", str(tmp_path / "a.png")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "error: cannot reach http://127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_version_number_serves_too(registry, tmp_path):
    process, url = start_server(f"models:/{MODEL_NAME}/{registry.version}", registry.uri,
                                tmp_path / "server.log")
    try:
        files = [encode(image) for image in sample_images(2)]
        assert_same_answer(predictions(invoke(url, split_body(files))),
                           registry.pyfunc.predict(frame(files)))
    finally:
        stop_server(process)
