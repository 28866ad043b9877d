"""Upload and download of a checkpoint to a local S3 server: shardwise against s3fs's ``put``/``get`` of
the same files, as ratios (one run, variants interleaved).

The server is moto's standalone server in its own process on 127.0.0.1 (a random free port), so it
does not share the benchmark's interpreter. Upload: ``save_checkpoint`` to ``s3://`` (parallel
multipart uploads from tensor memory, then the marker) against ``fs.put`` of the folder. Download:
``load_checkpoint`` from ``s3://`` into an empty cache (parallel ranged GETs, then the mapping)
against ``fs.get`` of the folder. Rerun: ``make bench`` (1 GB) or
``.venv/bin/python -m pytest benches/test_bench_remote.py -s``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import bench_bytes, make_checkpoint

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

ENV = {
    "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **ENV})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto's server did not start within 60 s") from None
            time.sleep(0.1)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def test_remote_upload_download_ratios(server, request, monkeypatch):
    from shardwise import FullModelHFCheckpointer

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    opts = {"endpoint_url": server, "key": "bench", "secret": "bench", "skip_instance_cache": True}
    fs = s3fs.S3FileSystem(**opts)
    fs.mkdir("bench")
    smoke = request.config.getoption("benchmark_disable", False)
    tmp = Path(tempfile.mkdtemp(prefix="shardwise-bench-remote-"))
    try:
        src = tmp / "hf"
        if smoke:  # the `make test` pass: the 6.6 MB sample checkpoint, so that it stays quick
            from shardwise.sample import write_sample

            write_sample(src)
            names = sorted(p.name for p in src.glob("model-*.safetensors"))
        else:
            names = make_checkpoint(src, bench_bytes(request.config))
        files = [*names, "model.safetensors.index.json", "config.json"]
        size = sum((src / n).stat().st_size for n in files)
        fs.put(str(src) + "/", "bench/model/", recursive=True)

        def shardwise_upload(i: int) -> float:
            t0 = time.perf_counter()
            ck = FullModelHFCheckpointer(str(src), names, "LLAMA3", f"s3://bench/sw-up-{i}", storage_options=opts,
                                         cache_dir=tmp / f"cache-up-{i}", fsync=False)
            ck.save_checkpoint(ck.load_checkpoint(), epoch=0)
            return time.perf_counter() - t0

        def s3fs_put(i: int) -> float:
            t0 = time.perf_counter()
            fs.put([str(src / n) for n in files], f"bench/put-{i}/epoch_0/")
            return time.perf_counter() - t0

        def shardwise_download(i: int) -> float:
            t0 = time.perf_counter()
            ck = FullModelHFCheckpointer("s3://bench/model", names, "LLAMA3", str(tmp / f"out-{i}"),
                                         storage_options=opts, cache_dir=tmp / f"cache-down-{i}")
            state = ck.load_checkpoint()
            elapsed = time.perf_counter() - t0
            assert len(state["model"]) > 0
            return elapsed

        def s3fs_get(i: int) -> float:
            t0 = time.perf_counter()
            fs.get([f"bench/model/{n}" for n in files], str(tmp / f"get-{i}") + "/")
            return time.perf_counter() - t0

        variants = {"shardwise_upload": shardwise_upload, "s3fs_put": s3fs_put,
                    "shardwise_download": shardwise_download, "s3fs_get": s3fs_get}
        times = {}
        for i, (name, fn) in enumerate(variants.items()):  # interleaved: upload pair, then download pair
            os.sync()
            times[name] = fn(i)
            for p in tmp.glob("cache-*"):
                shutil.rmtree(p, ignore_errors=True)  # the cache and the downloads are not kept between variants
            for p in tmp.glob("get-*"):
                shutil.rmtree(p, ignore_errors=True)
        # what was timed is exact: the uploaded shards are the input's bytes
        for n in names[:1]:
            assert fs.cat_file(f"bench/sw-up-0/epoch_0/{n}") == (src / n).read_bytes()
        report = {
            "bytes": size,
            "seconds": {k: round(v, 3) for k, v in times.items()},
            "MB_per_s": {k: round(size / v / 1e6, 1) for k, v in times.items()},
            "s3fs_put_vs_shardwise_upload": times["s3fs_put"] / times["shardwise_upload"],
            "s3fs_get_vs_shardwise_download": times["s3fs_get"] / times["shardwise_download"],
        }
        print("\n" + json.dumps(report, indent=2))
        if not smoke:
            Path(".benchmarks").mkdir(exist_ok=True)
            Path(".benchmarks/ratios-remote.json").write_text(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
