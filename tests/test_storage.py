"""Object storage against a real S3 protocol server (moto in server mode on 127.0.0.1)."""

from __future__ import annotations

import base64
import json
import re
import uuid
from datetime import datetime, timezone

import pytest
import requests

from handler.errors import ConfigError, InvalidRequest, PayloadTooLarge, StorageReadError
from handler.service import WanService
from handler.storage import ObjectStore, StorageConfig, StorageUnavailable
from handler.version import code_version
from handler.video import probe_mp4
from tests.harness.payloads import SMALL, image_bytes, png_base64
from tests.harness.servers import start_server, stop_server

SMALL_BODY = {"prompt": "a paper boat on a river", **SMALL}


def _png_bytes(width=160, height=96) -> bytes:
    return image_bytes(width, height)


@pytest.fixture()
def bucket(moto):
    name = f"wan-{uuid.uuid4().hex[:12]}"
    moto.client().create_bucket(Bucket=name)
    return name


@pytest.fixture()
def aws_env(moto, monkeypatch):
    for name, value in moto.env().items():
        monkeypatch.setenv(name, value)


# -- configuration ----------------------------------------------------------------------


def test_config_from_env():
    assert StorageConfig.from_env({}) is None
    config = StorageConfig.from_env({"WAN_S3_BUCKET": "videos", "WAN_S3_PREFIX": "/wan/prod/",
                                     "WAN_S3_PRESIGN_EXPIRY_S": "600", "WAN_S3_INPUT_BUCKETS": "in-a, in-b,"})
    assert (config.bucket, config.prefix, config.presign_expiry_s) == ("videos", "wan/prod", 600)
    assert config.input_buckets == {"in-a", "in-b"}
    inputs_only = StorageConfig.from_env({"WAN_S3_INPUT_BUCKETS": "in-a"})
    assert inputs_only.bucket == "" and inputs_only.input_buckets == {"in-a"}


@pytest.mark.parametrize("name,value", [("WAN_S3_PRESIGN_EXPIRY_S", "abc"), ("WAN_S3_PRESIGN_EXPIRY_S", "0"),
                                        ("WAN_S3_PRESIGN_EXPIRY_S", str(8 * 24 * 3600)),
                                        ("WAN_S3_MAX_ATTEMPTS", "0")])
def test_bad_config_values_are_refused(name, value):
    with pytest.raises(ConfigError, match=name):
        StorageConfig.from_env({"WAN_S3_BUCKET": "videos", name: value})


# -- in-process, against moto -------------------------------------------------------------


def test_upload_presigned_url_and_sidecar(aws_env, moto, bucket):
    store = ObjectStore(StorageConfig(bucket=bucket, prefix="results/wan"))
    mp4 = b"\x00\x00\x00\x20ftypisom" + bytes(1000)
    stored = store.store_video(mp4, "req-123", {"parameters": {"prompt": "a cat", "seed": 7}, "variant": "ti2v-5b"})
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert stored.key == f"results/wan/{today}/req-123.mp4"
    assert stored.s3_uri == f"s3://{bucket}/{stored.key}"
    # A plain HTTP GET of the presigned URL (no AWS credentials) gives the same bytes.
    response = requests.get(stored.url, timeout=10)
    assert response.status_code == 200
    assert response.content == mp4
    assert response.headers["Content-Type"] == "video/mp4"
    sidecar = json.loads(moto.client().get_object(Bucket=bucket, Key=f"results/wan/{today}/req-123.json")["Body"].read())
    assert sidecar["parameters"] == {"prompt": "a cat", "seed": 7}
    assert sidecar["request_id"] == "req-123" and sidecar["video"]["bytes"] == len(mp4)


def test_large_video_goes_up_in_parts(aws_env, moto, bucket):
    store = ObjectStore(StorageConfig(bucket=bucket))
    mp4 = bytes(range(256)) * (20 * 1024 * 1024 // 256)  # 20 MiB, over the 16 MiB threshold
    stored = store.store_video(mp4, "req-big", {})
    head = moto.client().head_object(Bucket=bucket, Key=stored.key)
    assert head["ContentLength"] == len(mp4)
    assert re.search(r"-2\"?$", head["ETag"]), head["ETag"]  # a multipart ETag: md5-<parts>
    assert requests.get(stored.url, timeout=30).content == mp4


def test_missing_bucket_is_reported_and_uploads_pause(aws_env, caplog):
    store = ObjectStore(StorageConfig(bucket="no-such-bucket-here", recheck_s=60))
    store.check_at_start()  # must not raise
    assert "no-such-bucket-here" in caplog.text and "inline" in caplog.text
    with pytest.raises(StorageUnavailable, match="no-such-bucket-here"):
        store.store_video(b"x", "r", {})


def test_fetch_image_rules(aws_env, moto, bucket):
    client = moto.client()
    client.put_object(Bucket=bucket, Key="in/cat.png", Body=_png_bytes())
    client.put_object(Bucket=bucket, Key="in/big.png", Body=bytes(2048))
    store = ObjectStore(StorageConfig(bucket="", input_buckets=frozenset({bucket})))
    assert store.fetch_image(f"s3://{bucket}/in/cat.png", "image", 1024 * 1024) == _png_bytes()
    with pytest.raises(InvalidRequest, match="not an allowed input bucket"):
        store.fetch_image("s3://other-bucket/in/cat.png", "image", 1024 * 1024)
    with pytest.raises(InvalidRequest, match="does not exist"):
        store.fetch_image(f"s3://{bucket}/in/missing.png", "image", 1024 * 1024)
    with pytest.raises(PayloadTooLarge):
        store.fetch_image(f"s3://{bucket}/in/big.png", "image", 1024)
    with pytest.raises(InvalidRequest, match="s3://bucket/key"):
        store.fetch_image(f"s3://{bucket}", "image", 1024)


def test_fetch_image_when_storage_is_down_is_a_502(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    store = ObjectStore(StorageConfig(bucket="", input_buckets=frozenset({"inputs"}), max_attempts=1))
    with pytest.raises(StorageReadError) as raised:
        store.fetch_image("s3://inputs/cat.png", "image", 1024)
    assert raised.value.http_status == 502


def test_service_returns_url_and_falls_back_inline(aws_env, moto, bucket, services):
    base = services["ti2v-5b"]
    store = ObjectStore(StorageConfig(bucket=bucket, recheck_s=0))
    service = WanService(base.config, base.pipeline, store, {"name": "wan", "version": "1.0"})
    result = service.handle(dict(SMALL_BODY, seed=3), "req-url").body
    assert set(result["video"]) == {"url", "s3_uri", "content_type"}
    assert result["warnings"] == [] and "upload_s" in result["timings"]
    assert probe_mp4(requests.get(result["video"]["url"], timeout=10).content).num_frames == SMALL["num_frames"]
    sidecar_key = result["video"]["s3_uri"].split("/", 3)[3].replace(".mp4", ".json")
    sidecar = json.loads(moto.client().get_object(Bucket=bucket, Key=sidecar_key)["Body"].read())
    assert sidecar["parameters"]["seed"] == 3 and sidecar["model"] == {"name": "wan", "version": "1.0"}
    assert sidecar["variant"] == "ti2v-5b" and "denoise_s" in sidecar["timings"]
    assert sidecar["code_version"] == result["code_version"] == code_version().to_json()

    moto.client().delete_objects(Bucket=bucket, Delete={"Objects": [
        {"Key": obj["Key"]} for obj in moto.client().list_objects_v2(Bucket=bucket)["Contents"]]})
    moto.client().delete_bucket(Bucket=bucket)
    result = service.handle(dict(SMALL_BODY), "req-lost-bucket").body
    assert "base64" in result["video"] and "url" not in result["video"]
    assert len(result["warnings"]) == 1 and "NoSuchBucket" in result["warnings"][0]


def test_storage_fallback_is_counted_apart_from_ok(aws_env, moto, services):
    from handler.metrics import GenerationMetrics

    counted = []
    base = services["ti2v-5b"]
    store = ObjectStore(StorageConfig(bucket=f"missing-{uuid.uuid4().hex[:8]}", recheck_s=0, max_attempts=1))
    service = WanService(base.config, base.pipeline, store, metrics=GenerationMetrics(
        lambda metric, value, labels: counted.append((metric.name, dict(labels))), "wan"))
    result = service.handle(dict(SMALL_BODY), "req-fallback").body
    assert "base64" in result["video"] and result["warnings"]
    assert ("wan_requests_total", {"ModelName": "wan", "outcome": "storage_fallback", "status": "200"}) in counted
    assert ("wan_stage_seconds", {"ModelName": "wan", "stage": "upload"}) in counted


# -- through TorchServe ------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory, server_weights, moto):
    results, inputs = f"wan-results-{uuid.uuid4().hex[:8]}", f"wan-inputs-{uuid.uuid4().hex[:8]}"
    client = moto.client()
    client.create_bucket(Bucket=results)
    client.create_bucket(Bucket=inputs)
    env = dict(moto.env(), WAN_S3_BUCKET=results, WAN_S3_PREFIX="wan", WAN_S3_INPUT_BUCKETS=inputs,
               WAN_S3_RECHECK_S="1", WAN_S3_MAX_ATTEMPTS="2")
    server = start_server(tmp_path_factory.mktemp("torchserve-s3"), server_weights, extra_env=env)
    server.buckets = {"results": results, "inputs": inputs}
    yield server
    stop_server(server)


def test_url_output_through_torchserve(s3_server):
    response = s3_server.predict(dict(SMALL_BODY, seed=17))  # output defaults to url with a bucket
    assert response.status_code == 200, response.text
    video = response.json()["video"]
    assert video["s3_uri"].startswith(f"s3://{s3_server.buckets['results']}/wan/")
    download = requests.get(video["url"], timeout=10)
    assert download.headers["Content-Type"] == "video/mp4"
    assert probe_mp4(download.content).num_frames == SMALL["num_frames"]


def test_s3_outage_returns_inline_with_warning_then_urls_again(s3_server, moto):
    pids = s3_server.worker_pids()
    moto.stop()
    try:
        response = s3_server.predict(dict(SMALL_BODY))
        assert response.status_code == 200, response.text
        result = response.json()
        assert "base64" in result["video"] and "url" not in result["video"]
        assert "inline" in result["warnings"][0]
        assert probe_mp4(base64.b64decode(result["video"]["base64"])).num_frames == SMALL["num_frames"]
    finally:
        moto.start()  # a fresh, empty S3: the bucket comes back as an operator would recreate it
        moto.client().create_bucket(Bucket=s3_server.buckets["results"])
        moto.client().create_bucket(Bucket=s3_server.buckets["inputs"])
    # WAN_S3_RECHECK_S=1: after a second the server tries again; bounded wait for URLs.
    for _ in range(20):
        result = s3_server.predict(dict(SMALL_BODY)).json()
        if "url" in result["video"]:
            break
    assert "url" in result["video"] and result["warnings"] == []
    assert s3_server.worker_pids() == pids


def test_s3_image_input_end_to_end(s3_server, moto):
    moto.client().put_object(Bucket=s3_server.buckets["inputs"], Key="cats/cat.png", Body=_png_bytes(160, 96))
    response = s3_server.predict(dict(SMALL_BODY, image=f"s3://{s3_server.buckets['inputs']}/cats/cat.png",
                                      width=160, height=96, output="inline"))
    assert response.status_code == 200, response.text
    assert probe_mp4(base64.b64decode(response.json()["video"]["base64"])).width == 160


def test_s3_image_input_rejections(s3_server, moto):
    inputs = s3_server.buckets["inputs"]
    client = moto.client()
    client.put_object(Bucket=inputs, Key="text.png", Body=b"this is not an image at all")
    client.put_object(Bucket=inputs, Key="huge.png", Body=b"\x89PNG\r\n\x1a\n" + bytes(17 * 1024 * 1024))
    cases = [
        (f"s3://{s3_server.buckets['results']}/anything.png", 400, "allowed input bucket"),
        (f"s3://{inputs}/missing.png", 400, "does not exist"),
        (f"s3://{inputs}/huge.png", 413, "limit"),
        (f"s3://{inputs}/text.png", 400, "not a PNG, JPEG or WebP"),
        ("https://example.com/cat.png", 400, "never fetches remote URLs"),
    ]
    for uri, status, words in cases:
        response = s3_server.predict(dict(SMALL_BODY, image=uri))
        assert response.status_code == status, (uri, response.text)
        error = response.json()["error"]
        assert error["field"] == "image" and words in error["message"], (uri, error)


def test_missing_bucket_at_start_serves_inline_without_crash_loop(tmp_path_factory, server_weights, moto):
    env = dict(moto.env(), WAN_S3_BUCKET="bucket-that-does-not-exist", WAN_S3_RECHECK_S="60")
    server = start_server(tmp_path_factory.mktemp("torchserve-nobucket"), server_weights, extra_env=env)
    try:
        pids = server.worker_pids()
        for _ in range(3):
            result = server.predict(dict(SMALL_BODY)).json()
            assert "base64" in result["video"]
            assert "bucket-that-does-not-exist" in result["warnings"][0]
        assert server.worker_pids() == pids
        log = (server.layout.run_dir / "logs" / "model_log.log").read_text()
        assert "bucket-that-does-not-exist is not usable" in log
    finally:
        stop_server(server)


def test_url_output_is_refused_without_storage(torchserve):
    response = torchserve.predict(dict(SMALL_BODY, output="url"))
    assert response.status_code == 400 and "WAN_S3_BUCKET" in response.json()["error"]["message"]


def test_s3_image_is_refused_without_input_buckets(torchserve):
    response = torchserve.predict(dict(SMALL_BODY, image="s3://some-bucket/cat.png"))
    assert response.status_code == 400 and "remote URLs" in response.json()["error"]["message"]


def test_data_url_still_works_with_storage(s3_server):
    response = s3_server.predict(dict(SMALL_BODY, image=png_base64(data_url=True), width=128, height=128))
    assert response.status_code == 200


def test_client_prints_the_url_and_downloads_when_asked(s3_server, tmp_path, capsys, monkeypatch):
    from scripts import client

    monkeypatch.setenv("WAN_KEY_FILE", str(s3_server.layout.key_file))
    monkeypatch.chdir(tmp_path)  # where an unwanted output.mp4 would land
    url = s3_server.layout.inference_url
    client.main(["--prompt", "a boat", "--width", "128", "--height", "128", "--num-frames", "9",
                 "--steps", "2", "--url", url, "--no-stream"])
    printed = json.loads(capsys.readouterr().out.split("\n}")[0] + "\n}")
    assert printed["url"].startswith("http") and printed["s3_uri"].startswith("s3://")
    assert list(tmp_path.iterdir()) == []  # a URL result, not asked to download: nothing saved
    out = tmp_path / "boat.mp4"
    client.main(["--prompt", "a boat", "--width", "128", "--height", "128", "--num-frames", "9",
                 "--steps", "2", "--url", url, "--out", str(out)])
    assert probe_mp4(out.read_bytes()).num_frames == 9
