"""Classify image files with a served model.

    python -m cifar_resnet.client http://127.0.0.1:5000 photo.jpg some_folder/ ...

Prints one line per file: ``path<TAB>class<TAB>confidence``. Folders are searched
recursively for .png, .jpg, .jpeg, .bmp and .webp files. Files go in batches
(``--batch-size``); a file the server rejects is reported with the server's message
and the rest of its batch is sent again without it. Standard library only, so it runs
wherever Python does.

Exit status: 0 all files classified, 1 some rejected, 2 server unreachable or bad usage.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
# The server names the culprit as "image <index in the request>: ..." (see serving.py).
_IMAGE_ERROR = re.compile(r"^image (\d+): (.*)", re.DOTALL)


class ServerError(Exception):
    """The server answered with an HTTP error; ``message`` is what it said was wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def find_files(paths: list[str]) -> list[Path]:
    """Files as given (whatever their suffix), folders expanded to the images inside."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {name}")
    return files


def invocations_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/invocations") else url + "/invocations"


def _server_message(body: bytes) -> str:
    try:
        message = json.loads(body)["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", errors="replace").strip()[:1000]
    # The scoring server prefixes a dump of the whole input; the reason follows it.
    return message.split("\nError: ", 1)[-1]


def classify(url: str, files: list[Path], tta: str = "none", timeout: float = 120) -> list[dict]:
    """One request for ``files``: the server's predictions, one dict per file."""
    rows = [[base64.b64encode(path.read_bytes()).decode("ascii")] for path in files]
    body = {"dataframe_split": {"columns": ["image"], "data": rows}}
    if tta != "none":
        body["params"] = {"tta": tta}
    request = urllib.request.Request(
        invocations_url(url),
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)["predictions"]
    except urllib.error.HTTPError as error:
        raise ServerError(error.code, _server_message(error.read())) from None
    except urllib.error.URLError as error:
        raise ConnectionError(f"cannot reach {invocations_url(url)}: {error.reason}") from None
    except TimeoutError:
        raise ConnectionError(
            f"no answer from {invocations_url(url)} within {timeout:g} s"
        ) from None


def classify_all(url: str, files: list[Path], tta: str = "none", timeout: float = 120):
    """Yield (path, prediction or None, error or None) for every file, working around
    files the server rejects and batches over its size limits."""
    if not files:
        return
    try:
        predictions = classify(url, files, tta, timeout)
    except ServerError as error:
        culprit = _IMAGE_ERROR.match(error.message)
        if culprit and int(culprit.group(1)) < len(files):
            bad = int(culprit.group(1))
            yield from classify_all(url, files[:bad], tta, timeout)
            yield files[bad], None, culprit.group(2)
            yield from classify_all(url, files[bad + 1 :], tta, timeout)
        elif len(files) > 1 and error.status < 500:  # e.g. over the request limit: halve it
            half = len(files) // 2
            yield from classify_all(url, files[:half], tta, timeout)
            yield from classify_all(url, files[half:], tta, timeout)
        else:
            yield from ((path, None, f"HTTP {error.status}: {error.message}") for path in files)
        return
    yield from ((path, prediction, None) for path, prediction in zip(files, predictions))


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive, finite number of seconds")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cifar_resnet.client",
        description="Classify image files with a served model.",
    )
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:5000")
    parser.add_argument("paths", nargs="+", metavar="FILE_OR_FOLDER")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="files per request")
    parser.add_argument(
        "--tta",
        default="none",
        help="test-time augmentation: none or a view set "
        "(identity, flip, flip_shift, seed); the server checks the name",
    )
    parser.add_argument("--timeout", type=_positive_float, default=120, help="seconds per request")
    args = parser.parse_args(argv)
    try:
        files = find_files(args.paths)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not files:
        print("error: no image files found", file=sys.stderr)
        return 2
    rejected = 0
    try:
        for start in range(0, len(files), args.batch_size):
            batch = files[start : start + args.batch_size]
            for path, prediction, error in classify_all(args.url, batch, args.tta, args.timeout):
                if error is not None:
                    rejected += 1
                    print(f"{path}\terror: {error}", file=sys.stderr)
                else:
                    confidence = max(prediction["probabilities"])
                    print(f"{path}\t{prediction['class_name']}\t{confidence:.4f}", flush=True)
    except ConnectionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if rejected else 0


if __name__ == "__main__":
    sys.exit(main())
