"""The KServe model store: its layout, its upload to S3 (moto), and a real TorchServe started
from it exactly as the wan-torchserve runtime starts it, answering both KServe protocols."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import requests
import yaml

from handler.video import probe_mp4
from model_store.kserve_store import (
    CONFIG_FILE,
    METRICS_CONFIG,
    MODEL_CONFIG_DIR,
    MODEL_NAME,
    MODEL_VERSION,
    TEMPLATE,
    VARIANTS,
    StoreError,
    build_kserve_store,
    build_main,
    inspect_store,
    parse_s3_uri,
    read_properties,
    render_config_properties,
    snapshot_of,
    store_files,
    upload_main,
    upload_model_store,
    variant_config_file,
    weights_location,
)
from scripts.serve import ServerLayout, free_ports, start, stop
from tests.harness.dockerfile import image_env
from tests.harness.payloads import SMALL

TINY_CONFIG = MODEL_CONFIG_DIR / "tiny-ti2v.yaml"
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}
REQUEST = {"prompt": "a paper boat on a river", **SMALL}


# -- layout -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_store_layout_matches_what_the_runtime_reads(tmp_path, variant):
    store = build_kserve_store(variant_config_file(variant), tmp_path / variant)
    assert store.config_file == tmp_path / variant / "config" / "config.properties"
    assert (store.model_store / "wan" / "MAR-INF" / "MANIFEST.json").is_file()
    assert (store.model_store / "wan" / "wan_handler.py").is_file()
    assert not (store.model_store / "wan" / "handler").exists()  # the image's package is the one copy
    assert (store.root / "config" / "metrics.yaml").read_text() == METRICS_CONFIG.read_text()
    config = yaml.safe_load((store.model_dir / "model-config.yaml").read_text())
    # handler.model_path resolves inside the store once KServe mounts it at /mnt/models.
    assert config["handler"]["model_path"] == f"/mnt/models/weights/{variant}"
    assert store.weights_dir == store.root / "weights" / variant
    assert not [p for p in store.root.rglob("*") if p.suffix in WEIGHT_SUFFIXES]
    (store.root / "config" / "metrics.yaml").unlink()  # config.properties names it
    with pytest.raises(StoreError, match="config/metrics.yaml is missing"):
        inspect_store(store.root)


@pytest.mark.parametrize("variant", VARIANTS)
def test_snapshot_carries_the_model_configs_workers_and_timeouts(tmp_path, variant):
    expected = yaml.safe_load(variant_config_file(variant).read_text())
    store = build_kserve_store(variant_config_file(variant), tmp_path)
    properties = read_properties(store.config_file.read_text())
    [(name, versions)] = snapshot_of(properties)["models"].items()
    entry = versions[MODEL_VERSION]
    assert name == MODEL_NAME and entry["marName"] == MODEL_NAME and entry["defaultVersion"] is True
    for key in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout"):
        assert entry[key] == expected[key], key
    # Everything else is the template, unchanged.
    template = read_properties(TEMPLATE.read_text())
    assert {k: v for k, v in properties.items() if k != "model_snapshot"} == template


def test_template_settings_kserve_relies_on():
    properties = read_properties(TEMPLATE.read_text())
    assert properties["inference_address"] == "http://0.0.0.0:8085"
    assert properties["management_address"].startswith("http://127.0.0.1:")
    assert properties["disable_token_authorization"] == "true"
    assert properties["metrics_mode"] == "prometheus"
    assert "model_snapshot" not in properties and "load_models" not in properties
    # The comment that says why token auth is off sits right above the setting.
    text = TEMPLATE.read_text()
    comment = text[:text.index("disable_token_authorization=true")].rsplit("\n\n", 1)[-1]
    assert "probe" in comment and "Token authorization OFF" in comment


def test_template_with_a_model_list_is_refused():
    config = yaml.safe_load(variant_config_file("ti2v-5b").read_text())
    with pytest.raises(StoreError, match="sets model_snapshot"):
        render_config_properties(config, TEMPLATE.read_text() + "\nmodel_snapshot={}\n")
    with pytest.raises(StoreError, match="sets load_models"):
        render_config_properties(config, "load_models=all\n")


def test_missing_timeouts_are_refused_not_defaulted():
    config = yaml.safe_load(variant_config_file("t2v-a14b").read_text())
    del config["startupTimeout"]
    with pytest.raises(StoreError, match="startupTimeout missing.*120 s"):
        render_config_properties(config)
    with pytest.raises(StoreError, match="minWorkers 3 > maxWorkers 1"):
        render_config_properties(dict(config, startupTimeout=10, minWorkers=3))


def test_read_properties_follows_java_rules():
    text = "# comment\n! also a comment\na=1\nb : two words \n  c=x\\\n    y\nempty=\n"
    assert read_properties(text) == {"a": "1", "b": "two words", "c": "xy", "empty": ""}


@pytest.mark.parametrize(("model_path", "expected"), [
    ("/mnt/models/weights/ti2v-5b", "weights/ti2v-5b"),
    ("../../weights/tiny-ti2v-5b", "weights/tiny-ti2v-5b"),
    ("/data/Wan2.2-TI2V-5B", None),
    ("../../../outside", None),
    ("/mnt/models/model-store/wan", None),
])
def test_weights_location(model_path, expected):
    location = weights_location(model_path)
    assert (str(location) if location else None) == expected


def test_weights_are_copied_readable_for_the_server_user(tmp_path, server_weights):
    source = tmp_path / "ckpt"
    shutil.copytree(server_weights / "tiny-ti2v-5b", source)
    some_file = next(p for p in source.rglob("*.safetensors"))
    some_file.chmod(0o600)  # as diffusers may save them
    store = build_kserve_store(TINY_CONFIG, tmp_path / "store", weights=source)
    copied = store.weights_dir / some_file.relative_to(source)
    assert copied.read_bytes() == some_file.read_bytes()
    assert copied.stat().st_mode & 0o044 == 0o044
    with pytest.raises(StoreError, match="not a diffusers checkpoint"):
        build_kserve_store(TINY_CONFIG, tmp_path / "x", weights=tmp_path)


def test_inspect_refuses_a_folder_that_is_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="config/config.properties is missing"):
        inspect_store(tmp_path)
    (tmp_path / "config").mkdir()
    (tmp_path / CONFIG_FILE).write_text("inference_address=http://0.0.0.0:8085\n")
    with pytest.raises(StoreError, match="no model_snapshot"):
        inspect_store(tmp_path)


def test_build_command_line(tmp_path, capsys):
    build_main(["--variant", "i2v-a14b", "--out", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert "responseTimeout 1800 s" in out and "s3://wan-models/i2v-a14b" in out
    assert inspect_store(tmp_path / "s").weights_dir == (tmp_path / "s" / "weights" / "i2v-a14b").resolve()


# -- upload -----------------------------------------------------------------------------


@pytest.mark.parametrize(("uri", "expected"), [
    ("s3://wan-models/ti2v-5b", ("wan-models", "ti2v-5b")),
    ("s3://wan-models/ti2v-5b/", ("wan-models", "ti2v-5b")),
    ("s3://wan.models-1/a/b", ("wan.models-1", "a/b")),
])
def test_parse_s3_uri(uri, expected):
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize("uri", ["s3:/wan-models/x", "gs://wan-models/x", "s3://Wan_Models/x", "s3://ab/x",
                                 "s3://wan-models/a//b", "s3://wan-models/a b"])
def test_parse_s3_uri_refuses(uri):
    with pytest.raises(StoreError):
        parse_s3_uri(uri)


@pytest.fixture
def tiny_store(tmp_path, server_weights):
    # Weights symlinked, as for a local upload of a big checkpoint: the uploader follows the link.
    return build_kserve_store(TINY_CONFIG, tmp_path / "store",
                              weights=server_weights / "tiny-ti2v-5b", link_weights=True)


def _keys(client, bucket: str, prefix: str = "") -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def test_upload_puts_the_store_under_the_prefix(moto, tiny_store):
    client = moto.client()
    client.create_bucket(Bucket="wan-models-upload")
    logged: list[str] = []
    report = upload_model_store(tiny_store.root, "s3://wan-models-upload/tiny", client, log=logged.append)
    expected = {f"tiny/{relative}" for relative, _ in store_files(tiny_store.root)}
    assert _keys(client, "wan-models-upload") == expected == set(report.uploaded)
    assert {"tiny/config/config.properties", "tiny/model-store/wan/MAR-INF/MANIFEST.json",
            "tiny/model-store/wan/model-config.yaml", "tiny/weights/tiny-ti2v-5b/model_index.json"} <= expected
    assert not [k for k in expected if "__pycache__" in k or k.endswith(".pyc")]
    # config.properties goes last (after the metrics.yaml it names): a store with it is complete.
    assert "config/config.properties" in logged[-1] and "config/metrics.yaml" in logged[-2]
    body = client.get_object(Bucket="wan-models-upload", Key="tiny/config/config.properties")["Body"].read()
    assert body == (tiny_store.root / CONFIG_FILE).read_bytes()
    weights = client.get_object(Bucket="wan-models-upload", Key="tiny/weights/tiny-ti2v-5b/model_index.json")
    assert weights["Body"].read() == (tiny_store.weights_dir / "model_index.json").read_bytes()


def test_upload_again_sends_only_what_changed_and_delete_prunes(moto, tiny_store):
    client = moto.client()
    client.create_bucket(Bucket="wan-models-sync")
    first = upload_model_store(tiny_store.root, "s3://wan-models-sync/tiny", client)
    again = upload_model_store(tiny_store.root, "s3://wan-models-sync/tiny", client)
    assert again.uploaded == [] and sorted(again.skipped) == sorted(first.uploaded)
    (tiny_store.root / CONFIG_FILE).write_text((tiny_store.root / CONFIG_FILE).read_text() + "# changed\n")
    client.put_object(Bucket="wan-models-sync", Key="tiny/weights/old/model.safetensors", Body=b"stale")
    client.put_object(Bucket="wan-models-sync", Key="tiny-other/keep.txt", Body=b"not ours")
    kept = upload_model_store(tiny_store.root, "s3://wan-models-sync/tiny", client)
    assert kept.uploaded == ["tiny/config/config.properties"] and kept.deleted == []
    assert "tiny/weights/old/model.safetensors" in _keys(client, "wan-models-sync")
    pruned = upload_model_store(tiny_store.root, "s3://wan-models-sync/tiny", client, delete=True)
    assert pruned.deleted == ["tiny/weights/old/model.safetensors"]
    assert _keys(client, "wan-models-sync", "tiny/") == set(first.uploaded)
    assert "tiny-other/keep.txt" in _keys(client, "wan-models-sync")


def test_upload_command_line_uses_botos_environment(moto, tiny_store, monkeypatch, capsys):
    for name, value in moto.env().items():
        monkeypatch.setenv(name, value)
    moto.client().create_bucket(Bucket="wan-models-cli")
    upload_main([str(tiny_store.root), "s3://wan-models-cli/ti2v"])
    assert "uploaded" in capsys.readouterr().out
    assert "ti2v/config/config.properties" in _keys(moto.client(), "wan-models-cli")
    with pytest.raises(SystemExit, match="not a KServe model store"):
        upload_main([str(tiny_store.root / "model-store"), "s3://wan-models-cli/x"])


# -- the store in a real TorchServe, started as KServe starts it ------------------------


def _local_store(root: Path, weights: Path, model_config: Path) -> tuple[Path, dict[str, int]]:
    """A store built by the builder, its config.properties adapted to 127.0.0.1 and free ports:
    the only lines that differ from what KServe mounts."""
    store = build_kserve_store(model_config, root / "store", weights=weights)
    inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
    text = store.config_file.read_text()
    replacements = {
        "inference_address=http://0.0.0.0:8085": f"inference_address=http://127.0.0.1:{inference}",
        "management_address=http://127.0.0.1:8081": f"management_address=http://127.0.0.1:{management}",
        "metrics_address=http://0.0.0.0:8082": f"metrics_address=http://127.0.0.1:{metrics}",
        "grpc_inference_port=7070": f"grpc_inference_port={grpc_inference}",
        "grpc_management_port=7071": f"grpc_management_port={grpc_management}",
        "metrics_config=/mnt/models/config/metrics.yaml": f"metrics_config={store.root / 'config' / 'metrics.yaml'}",
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    store.config_file.write_text(text)
    return store.root, {"inference": inference, "management": management, "metrics": metrics}


def _start_kserve_style(tmp_path_factory, server_weights):
    root = tmp_path_factory.mktemp("kserve")
    # The tiny model's config with distinctive timeouts: they reach TorchServe only through the
    # generated model_snapshot.
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config.update(responseTimeout=97, startupTimeout=113, minWorkers=1, maxWorkers=1)
    model_config = root / "tiny-kserve.yaml"
    model_config.write_text(yaml.safe_dump(config))
    store, ports = _local_store(root, server_weights / "tiny-ti2v-5b", model_config)
    layout = ServerLayout(
        run_dir=root / "run", model_store=store / "model-store", ts_config=store / CONFIG_FILE,
        inference_url=f"http://127.0.0.1:{ports['inference']}",
        management_url=f"http://127.0.0.1:{ports['management']}",
        metrics_url=f"http://127.0.0.1:{ports['metrics']}",
        snapshot_models=True,
    )
    # torchserve --start --ncs --model-store=<store>/model-store --ts-config=<store>/config/config.properties,
    # no --models: the model comes from the model_snapshot. No TorchServe envelope: the handler reads
    # both protocols' bodies itself. No bytecode next to the handler, as the image sets it (the store
    # is read-only in the pod).
    start(layout, timeout_s=240, extra_env={"PYTHONDONTWRITEBYTECODE": image_env()["PYTHONDONTWRITEBYTECODE"]})
    return layout


@pytest.fixture(scope="module")
def kserve(tmp_path_factory, server_weights):
    """One server for both protocols, as one pod of the runtime serves either."""
    layout = _start_kserve_style(tmp_path_factory, server_weights)
    yield layout
    stop(layout)


def test_store_loads_with_the_snapshots_workers_and_timeouts(kserve):
    [model] = requests.get(f"{kserve.management_url}/models/wan", timeout=10).json()
    assert (model["modelName"], model["modelVersion"]) == ("wan", MODEL_VERSION)
    assert (model["responseTimeout"], model["startupTimeout"]) == (97, 113)
    assert (model["minWorkers"], model["maxWorkers"], model["batchSize"]) == (1, 1, 1)
    assert [w["status"] for w in model["workers"]] == ["READY"]


def test_no_token_needed_as_for_kserves_probes(kserve):
    assert not kserve.key_file.exists()
    assert requests.get(f"{kserve.inference_url}/ping", timeout=10).json()["status"] == "Healthy"
    metrics = requests.get(f"{kserve.metrics_url}/metrics", timeout=10)
    # The store's metrics.yaml is the one TorchServe read: the handler's metrics are declared.
    assert metrics.status_code == 200 and "# TYPE wan_stage_seconds histogram" in metrics.text


def test_the_server_writes_neither_its_working_directory_nor_the_store(kserve):
    """In the pod both are read-only (the image's WORKDIR on a read-only root filesystem, the store
    KServe mounts at /mnt/models): TorchServe writes only to TEMP/TMPDIR and LOG_LOCATION, here
    run/tmp and run/logs, the pod's emptyDir mounts. After a generation, nothing else appeared."""
    response = requests.post(f"{kserve.inference_url}/v1/models/wan:predict",
                             json={"instances": [dict(REQUEST, seed=3)]}, timeout=120)
    assert response.status_code == 200, response.text
    assert {p.name for p in kserve.run_dir.iterdir()} <= {"tmp", "logs", "torchserve.out"}  # ours: the output
    store = kserve.model_store.parent
    written = [p for p in store.rglob("*") if p.name in ("__pycache__", "key_file.json", "logs") or p.suffix == ".pyc"]
    assert written == []


def test_kserve_v1_protocol(kserve):
    url = f"{kserve.inference_url}/v1/models/wan:predict"
    response = requests.post(url, json={"instances": [dict(REQUEST, seed=21)]}, timeout=120)
    assert response.status_code == 200, response.text
    [prediction] = response.json()["predictions"]
    assert prediction["seed"] == 21 and prediction["variant"] == "ti2v-5b"
    info = probe_mp4(base64.b64decode(prediction["video"]["base64"]))
    assert (info.width, info.height, info.num_frames) == (SMALL["width"], SMALL["height"], SMALL["num_frames"])
    bad = requests.post(url, json={"instances": [dict(REQUEST, num_frames=8)]}, timeout=60)
    assert bad.status_code == 400
    assert bad.json()["predictions"][0]["error"]["field"] == "num_frames"


def test_kserve_v1_refuses_several_instances_and_a_broken_list(kserve):
    url = f"{kserve.inference_url}/v1/models/wan:predict"
    two = requests.post(url, json={"instances": [REQUEST, REQUEST]}, timeout=60)
    assert two.status_code == 400
    assert "one request per call (got 2" in two.json()["predictions"][0]["error"]["message"]
    broken = requests.post(url, json={"instances": "a red fox"}, timeout=60)
    assert broken.status_code == 400
    assert broken.json()["predictions"][0]["error"]["field"] == "instances"


@pytest.mark.parametrize(("path", "body", "words"), [
    ("/v1/models/wan:predict", b"{not json", "not valid JSON"),
    ("/v1/models/wan:predict", b"[1, 2]", "must be a JSON object"),
    ("/v2/models/wan/infer", b'{"inputs": "x"}', "inputs must be a list"),
    ("/v2/models/wan/infer", b'{"inputs": [{"name": "r", "datatype": "BYTES", "shape": [1], "data": [7]}]}',
     "must be a JSON object"),
])
def test_malformed_kserve_bodies_are_400s_not_torchserves_503(kserve, path, body, words):
    """TorchServe's own KServe envelopes raised on these: 503 "Prediction failed", retried by clients."""
    response = requests.post(kserve.inference_url + path, data=body,
                             headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    assert words in response.text
    [model] = requests.get(f"{kserve.management_url}/models/wan", timeout=10).json()
    assert [w["status"] for w in model["workers"]] == ["READY"]


def _v2_body(request: dict) -> dict:
    """An Open Inference Protocol request: the JSON request as one BYTES element."""
    return {"id": "req-v2", "inputs": [{"name": "request", "shape": [1], "datatype": "BYTES",
                                        "data": [json.dumps(request)]}]}


def test_kserve_v2_protocol_wraps_the_answer_in_the_open_inference_protocol(kserve):
    response = requests.post(f"{kserve.inference_url}/v2/models/wan/infer", json=_v2_body(REQUEST), timeout=120)
    body = response.json()
    assert body["id"] == "req-v2" and body["model_name"] == "wan" and body["model_version"] == MODEL_VERSION
    [output] = body["outputs"]
    # The protocol's answer: one BYTES element, the handler's JSON answer as text.
    assert output["name"] == "response" and output["datatype"] == "BYTES" and len(output["data"]) == 1
    assert json.loads(output["data"][0])["video"]["content_type"] == "video/mp4"


def test_kserve_v2_protocol_generates_a_video(kserve):
    response = requests.post(f"{kserve.inference_url}/v2/models/wan/infer",
                             json=_v2_body(dict(REQUEST, seed=5)), timeout=120)
    assert response.status_code == 200, response.text
    [text] = response.json()["outputs"][0]["data"]
    result = json.loads(text)
    assert result["seed"] == 5
    assert probe_mp4(base64.b64decode(result["video"]["base64"])).num_frames == SMALL["num_frames"]
