"""Load-test a served classifier: latency p50/p99 and images/s at each concurrency and
batch size, bounded in requests and seconds per configuration.

Against a running server:

    python scripts/bench_serving.py --url http://127.0.0.1:5000

Or self-contained: register a random-init model in a throw-away store, serve it with
`mlflow models serve --env-manager local` on a free 127.0.0.1 port, measure, stop it:

    python scripts/bench_serving.py --serve seed_resnet

Requests carry PNG files (CIFAR-10 test images when CIFAR10_ROOT is set, else
synthetic ones) base64-encoded in ``dataframe_split``, as the client sends them. Each
worker thread keeps one HTTP/1.1 connection open. The client runs on the same machine
as the server, so they share its cores.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

BIN = Path(sys.executable).parent
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
BODIES_PER_CONFIG = 8  # distinct request bodies, cycled, so not every request is identical


def sample_images(count: int) -> np.ndarray:
    if os.environ.get("CIFAR10_ROOT"):
        from cifar_resnet import data

        return data.load_cifar10(os.environ["CIFAR10_ROOT"], train=False)[0][:count]
    return np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def request_bodies(images: np.ndarray, batch: int) -> list[bytes]:
    def png_b64(image: np.ndarray) -> str:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    files = [png_b64(image) for image in images]
    bodies = []
    for i in range(BODIES_PER_CONFIG):
        rows = [[files[(i * batch + j) % len(files)]] for j in range(batch)]
        bodies.append(
            json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
        )
    return bodies


def run_config(
    url: str,
    bodies: list[bytes],
    batch: int,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    warmup: int,
) -> dict:
    parsed = urllib.parse.urlparse(url)
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    errors: list[str] = []

    def post(connection: http.client.HTTPConnection, body: bytes) -> None:
        connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {answer[:200]!r}")
        if len(json.loads(answer)["predictions"]) != batch:
            raise RuntimeError("wrong number of predictions")

    def worker(index: int, deadline: float) -> None:
        nonlocal issued
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
        try:
            while True:
                with lock:
                    if issued >= max_requests or time.perf_counter() > deadline:
                        return
                    number = issued
                    issued += 1
                started = time.perf_counter()
                try:
                    post(connection, bodies[number % len(bodies)])
                except Exception as error:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(str(error))
                    connection.close()
                    connection = http.client.HTTPConnection(
                        parsed.hostname, parsed.port, timeout=120
                    )
                    continue
                with lock:
                    latencies.append(time.perf_counter() - started)
        finally:
            connection.close()

    warm = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
    for i in range(warmup):
        post(warm, bodies[i % len(bodies)])
    warm.close()

    started = time.perf_counter()
    threads = [
        threading.Thread(target=worker, args=(i, started + max_seconds)) for i in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "batch": batch,
        "requests": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "images_per_s": len(latencies) * batch / wall,
        "wall_s": wall,
    }


def markdown(results: list[dict]) -> str:
    lines = [
        "| concurrency | images/request | requests | p50 latency (ms) | p99 latency (ms) "
        "| throughput (images/s) | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['concurrency']} | {r['batch']} | {r['requests']} | {r['p50_ms']:.1f} "
            f"| {r['p99_ms']:.1f} | {r['images_per_s']:.1f} | {r['errors']} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- --serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register_random_model(store: Path, model_name: str, registered_name: str) -> str:
    """A random-init ``model_name`` logged and registered as the training stage does;
    returns the tracking URI. Speed does not depend on the weights' values."""
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from cifar_resnet import serving, tracking
    from cifar_resnet.models import ImageClassifier, build_model

    uri = f"sqlite:///{store}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    torch.manual_seed(0)
    model = ImageClassifier(build_model(model_name), CIFAR_MEAN, CIFAR_STD).eval()
    weights = serving.save_weights(
        store / "weights.pt",
        model,
        model_name,
        {},
        ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    )
    client = MlflowClient()
    experiment = client.create_experiment("bench", artifact_location=(store / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = tracking.log_classifier(weights, sample_images(2))
    version = tracking.register_model(info.model_uri, registered_name, {"model": model_name})
    client.set_registered_model_alias(registered_name, "champion", version.version)
    return uri


@contextlib.contextmanager
def served(model_uri: str, tracking_uri: str, log: Path):
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "models",
                "serve",
                "-m",
                model_uri,
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:5000")
    where.add_argument(
        "--serve", metavar="MODEL", help="serve a random-init MODEL (e.g. seed_resnet) for the run"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="images per request")
    parser.add_argument("--max-requests", type=int, default=400, help="per configuration")
    parser.add_argument("--max-seconds", type=float, default=20, help="per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="requests before timing")
    args = parser.parse_args()

    images = sample_images(max(256, max(args.batch) * BODIES_PER_CONFIG))
    with contextlib.ExitStack() as stack:
        if args.serve:
            store = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-serving-")))
            tracking_uri = register_random_model(store, args.serve, "bench-cifar10")
            url = stack.enter_context(
                served("models:/bench-cifar10@champion", tracking_uri, store / "server.log")
            )
            print(
                f"serving random-init {args.serve} as models:/bench-cifar10@champion at {url}",
                flush=True,
            )
        else:
            url = args.url.rstrip("/").removesuffix("/invocations")
        results = []
        for batch in args.batch:
            bodies = request_bodies(images, batch)
            for concurrency in args.concurrency:
                result = run_config(
                    url,
                    bodies,
                    batch,
                    concurrency,
                    args.max_requests,
                    args.max_seconds,
                    args.warmup,
                )
                results.append(result)
                print(
                    f"concurrency {concurrency:2d}, {batch:3d} images/request: "
                    f"{result['requests']} requests in {result['wall_s']:.1f} s, "
                    f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
                    f"{result['images_per_s']:.1f} images/s, {result['errors']} errors "
                    f"{result['first_error']}",
                    flush=True,
                )
    print()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"images: {'CIFAR-10 test' if os.environ.get('CIFAR10_ROOT') else 'synthetic'} PNGs; "
        f"at most {args.max_requests} requests or {args.max_seconds:g} s per row, "
        f"after {args.warmup} warm-up requests"
    )
    print(markdown(results))
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
