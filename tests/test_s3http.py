"""The S3 fast path (agent/sources/s3http.py) on its own: SigV4 signatures equal to botocore's
and accepted by a SeaweedFS that checks them, key encoding, error mapping, kept-alive
connections, credentials kept out of logs, virtual-hosted addressing and TLS. The conformance
suite (tests/test_sources.py) and the fault tests (tests/test_faults.py) cover the rest."""

from __future__ import annotations

import datetime
import http.server
import json
import logging
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import botocore.auth
import botocore.awsrequest
import botocore.config
import botocore.credentials
import botocore.utils
import pytest

from agent.errors import SourceError
from agent.sources import SourceOpener
from agent.sources import s3http as s3http_module
from agent.sources.base import ObjectInfo
from agent.sources.s3 import S3Settings
from agent.sources.s3http import CredentialChain, Credentials, S3HttpSource, Signer, uri_encode
from datacache.localcluster import (
    DEMO_CREDENTIALS,
    ClusterError,
    LocalCluster,
    free_port,
    s3_client,
    wait_until,
)

HOSTILE_KEYS = [
    "plain.bin",
    "space and+plus.txt",
    "percent%2Fslash%25.bin",
    "query?and#hash&eq=1",
    "tilde~star*quote'paren(1)!.bin",
    "ünïcode/✓/日本.txt",
    "colon:semi;comma,at@dollar$.bin",
    "brackets[]{}^`|\\.bin",
    "a/b//c",
]


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in DEMO_CREDENTIALS.items():
        monkeypatch.setenv(key, value)


def open_source(endpoint: str, uri: str, **settings: Any) -> S3HttpSource:
    source = SourceOpener(S3Settings(endpoint_url=endpoint, **settings)).open(uri)
    assert isinstance(source, S3HttpSource)
    return source


# Signing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_keys_are_percent_encoded_as_botocore_does(key: str) -> None:
    assert uri_encode(key, keep_slash=True) == botocore.utils.percent_encode(key, safe="/~")
    assert uri_encode(key, keep_slash=False) == botocore.utils.percent_encode(key)


@pytest.mark.parametrize(
    ("method", "key", "params", "headers", "token"),
    [
        ("GET", "ds/plain.bin", {}, {"x-amz-checksum-mode": "ENABLED"}, None),
        ("GET", "ds/space and+plus.txt", {}, {}, "session-token/with+odd=chars"),
        ("HEAD", "ds/ünïcode/✓/日本.txt", {"partNumber": "3"}, {}, None),
        ("GET", "", {"list-type": "2", "prefix": "ds/a b+c", "encoding-type": "url"}, {}, None),
        ("GET", "", {"continuation-token": "abc/def+=="}, {"x-amz-checksum-mode": "ENABLED"}, None),
    ],
)
def test_signature_equals_botocores(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    key: str,
    params: dict[str, str],
    headers: dict[str, str],
    token: str | None,
) -> None:
    now = datetime.datetime(2026, 11, 22, 7, 46, 34)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now)
    host = "127.0.0.1:8333"
    path = "/bucket" + (f"/{uri_encode(key, True)}" if key else "")
    query = s3http_module.canonical_query(params)
    url = f"http://{host}{path}" + (f"?{query}" if query else "")

    request = botocore.awsrequest.AWSRequest(method=method, url=url, headers=dict(headers))
    request.context["client_config"] = botocore.config.Config(s3={"payload_signing_enabled": False})
    botocore.auth.S3SigV4Auth(
        botocore.credentials.Credentials("AKIDEXAMPLE", "secret/key+example", token),
        "s3",
        "eu-west-3",
    ).add_auth(request)

    ours = dict(headers)
    Signer("eu-west-3").sign(
        method,
        host,
        path,
        query,
        ours,
        Credentials("AKIDEXAMPLE", "secret/key+example", token),
        amz_date=now.strftime("%Y%m%dT%H%M%SZ"),
    )
    assert ours["Authorization"] == request.headers["Authorization"]
    assert ours["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"


# A SeaweedFS that checks signatures ------------------------------------------------------------


@pytest.fixture(scope="module")
def signed_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SeaweedFS whose S3 gateway knows one identity, so it verifies every signature."""
    workdir = tmp_path_factory.mktemp("signed-s3")
    config = workdir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "demo",
                        "credentials": [
                            {
                                "accessKey": DEMO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                "secretKey": DEMO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                            }
                        ],
                        "actions": ["Admin", "Read", "List", "Write"],
                    }
                ]
            }
        )
    )
    with LocalCluster(workdir / "cluster") as cluster:
        ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        grpc_ports = {name: free_port() for name in ports}
        weed = subprocess.run(["which", "weed"], capture_output=True, text=True, check=True)
        data = workdir / "data"
        data.mkdir()
        process = cluster.spawn(
            "seaweedfs-signed",
            [
                weed.stdout.strip(),
                "server",
                f"-dir={data}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-master.port={ports['master']}",
                f"-master.port.grpc={grpc_ports['master']}",
                "-master.volumeSizeLimitMB=64",
                f"-volume.port={ports['volume']}",
                f"-volume.port.grpc={grpc_ports['volume']}",
                "-volume.max=100",
                "-filer",
                f"-filer.port={ports['filer']}",
                f"-filer.port.grpc={grpc_ports['filer']}",
                "-s3",
                f"-s3.port={ports['s3']}",
                f"-s3.port.grpc={grpc_ports['s3']}",
                f"-s3.config={config}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-metricsPort=0",
            ],
            stop_grace=1.0,
        )
        endpoint = f"http://127.0.0.1:{ports['s3']}"
        client = s3_client(endpoint)

        def ready() -> bool:
            if not process.alive():
                raise ClusterError(f"SeaweedFS exited:\n{process.log_tail()}")
            try:
                client.create_bucket(Bucket="signed")
            except Exception:  # any failure means "not ready yet"
                return False
            return True

        wait_until(ready, 60, "SeaweedFS with identities")
        yield endpoint


def test_a_server_that_checks_signatures_accepts_ours(signed_s3: str) -> None:
    client = s3_client(signed_s3)
    bodies = {key: os.urandom(1000 + i) for i, key in enumerate(HOSTILE_KEYS[:6])}
    for key, body in bodies.items():
        client.put_object(Bucket="signed", Key=f"ok/{key}", Body=body)
    source = open_source(signed_s3, "s3://signed/ok/")
    listed = {o.key: o for o in source.list()}
    assert set(listed) == set(bodies)
    for key, body in bodies.items():
        assert b"".join(source.read_range(listed[key], 0, len(body))) == body
        assert b"".join(source.read_range(listed[key], 10, 20)) == body[10:30]
        assert source.checksum(listed[key]) is not None


def test_a_wrong_secret_is_refused_and_never_shown(
    signed_s3: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client = s3_client(signed_s3)
    client.put_object(Bucket="signed", Key="wrong/f", Body=b"data")
    secret = "not-the-secret-0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    caplog.set_level(logging.DEBUG)
    source = open_source(signed_s3, "s3://signed/wrong/")
    with pytest.raises(SourceError, match=r"SignatureDoesNotMatch|AccessDenied|403") as listing:
        list(source.list())
    obj = ObjectInfo("f", 4, '"8d777f385d3dfec8815d20f7496026dc"')
    with pytest.raises(SourceError, match=r"SignatureDoesNotMatch|AccessDenied|403") as reading:
        list(source.read_range(obj, 0, 4))
    shown = [str(listing.value), str(reading.value), repr(source._credentials.get())]
    shown += [record.getMessage() for record in caplog.records]
    assert not [text for text in shown if secret in text]


# Errors, connections -------------------------------------------------------------------------


def test_errors_name_the_s3_error_code(s3_server: LocalCluster) -> None:
    s3_server.create_bucket("s3http-errors")
    s3_client(s3_server.s3_endpoint).put_object(Bucket="s3http-errors", Key="ds/f", Body=b"12345")
    source = open_source(s3_server.s3_endpoint, "s3://s3http-errors/ds/")
    (obj,) = source.list()
    with pytest.raises(SourceError, match=r"NoSuchKey|404"):
        list(source.read_range(ObjectInfo("missing", 5, obj.etag), 0, 5))
    with pytest.raises(SourceError, match="metadata of s3://s3http-errors/ds/missing"):
        source.stat("missing")
    # A range past the end of the object (its size was misreported).
    with pytest.raises(SourceError, match=r"InvalidRange|416"):
        list(source.read_range(ObjectInfo("f", 100, obj.etag), 50, 10))
    with pytest.raises(SourceError, match="NoSuchBucket"):
        list(open_source(s3_server.s3_endpoint, "s3://no-such-bucket-here/").list())
    # After every error the source still works.
    assert b"".join(source.read_range(obj, 1, 3)) == b"234"


def test_one_kept_alive_connection_serves_sequential_requests(
    s3_server: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_server.create_bucket("s3http-keepalive")
    client = s3_client(s3_server.s3_endpoint)
    for i in range(5):
        client.put_object(Bucket="s3http-keepalive", Key=f"ds/{i}", Body=os.urandom(5000))
    opened: list[object] = []
    real = s3http_module._Connection.__init__

    def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        opened.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(s3http_module._Connection, "__init__", counting)
    source = open_source(s3_server.s3_endpoint, "s3://s3http-keepalive/ds/")
    for obj in source.list():
        assert len(b"".join(source.read_range(obj, 0, obj.size))) == obj.size
        source.checksum(obj)
        list(source.read_range(obj, 100, 100))
    # A range read to its end hands its connection back; abandoning one closes it.
    first = next(iter(source.list()))
    assert len(opened) == 1
    body = source.open_range(first, 0, first.size)
    body.close()
    assert source.stat(first.key).etag == first.etag
    assert len(opened) == 2
    source.close()


# Addressing and TLS --------------------------------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers a listing with one object and GETs with its body; records Host and path."""

    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[tuple[str, str]]] = []
    body = b"served over a recorded connection"

    def do_GET(self) -> None:
        self.seen.append((self.headers["Host"], self.path))
        if "list-type=2" in self.path:
            payload = (
                '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
                'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><IsTruncated>false</IsTruncated>'
                f"<Contents><Key>ds/f</Key><Size>{len(self.body)}</Size>"
                "<ETag>&quot;abc&quot;</ETag></Contents></ListBucketResult>"
            ).encode()
        else:
            payload = self.body
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("ETag", '"abc"')
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.daemon_threads = True
    _Recorder.seen = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_virtual_hosted_addressing(
    recorder: http.server.ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = recorder.server_address[1]
    real = socket.create_connection

    def resolve(address: tuple[str, int], *args: Any, **kwargs: Any) -> Any:
        # No DNS here: the bucket's host name is this machine.
        assert address[0] == "bkt.localhost"
        return real(("127.0.0.1", address[1]), *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", resolve)
    source = open_source(f"http://localhost:{port}", "s3://bkt/ds/", addressing_style="virtual")
    (obj,) = source.list()
    assert b"".join(source.read_range(obj, 0, obj.size)) == _Recorder.body
    assert [host for host, _ in _Recorder.seen] == [f"bkt.localhost:{port}"] * 2
    assert _Recorder.seen[0][1].startswith("/?") and _Recorder.seen[1][1] == "/ds/f"


def test_https_with_the_default_trust_store(
    recorder: http.server.ThreadingHTTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    recorder.socket = context.wrap_socket(recorder.socket, server_side=True)
    port = recorder.server_address[1]
    uri = "s3://bkt/ds/"

    # Not trusted: the connection is refused, and the error says so.
    untrusted = open_source(f"https://localhost:{port}", uri, connect_timeout_seconds=5)
    with pytest.raises(SourceError, match="CERTIFICATE_VERIFY_FAILED"):
        list(untrusted.list())
    # Trusted through the default store (SSL_CERT_FILE): the copy goes through.
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    source = open_source(f"https://localhost:{port}", uri)
    (obj,) = source.list()
    assert b"".join(source.read_range(obj, 0, obj.size)) == _Recorder.body
    assert _Recorder.seen[-1] == (f"localhost:{port}", "/bkt/ds/f")


def test_credentials_repr_hides_secrets() -> None:
    shown = repr(Credentials("AKID", "the-secret", "the-token"))
    assert "AKID" in shown and "the-secret" not in shown and "the-token" not in shown


def test_credentials_from_the_environment_need_no_botocore(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok")
    chain = CredentialChain()
    assert chain.get() == Credentials(
        DEMO_CREDENTIALS["AWS_ACCESS_KEY_ID"], DEMO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], "tok"
    )
    # Without them, botocore's chain answers (here: a shared credentials file).
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    path = tmp_path / "credentials"
    path.write_text(
        "[default]\naws_access_key_id = from-file\naws_secret_access_key = file-secret\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(path))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert CredentialChain().get() == Credentials("from-file", "file-secret", None)


def test_hostile_keys_round_trip_on_moto(moto_endpoint: str) -> None:
    """moto stores keys SeaweedFS refuses; each is listed and read back byte for byte."""
    client = s3_client(moto_endpoint)
    client.create_bucket(Bucket="s3http-hostile")
    bodies = {key: os.urandom(100 + i) for i, key in enumerate(HOSTILE_KEYS)}
    bodies["../../etc/passwd"] = b"listed, never written by the engine"
    for key, body in bodies.items():
        client.put_object(Bucket="s3http-hostile", Key=f"ds/{key}", Body=body)
    source = open_source(moto_endpoint, "s3://s3http-hostile/ds/")
    listed = {o.key: o for o in source.list()}
    assert set(listed) == set(bodies)
    for key, body in bodies.items():
        if ".." in key:
            continue  # dot segments are normalised away by HTTP servers; plan() refuses them
        assert b"".join(source.read_range(listed[key], 0, len(body))) == body, key
        assert source.stat(key).etag == listed[key].etag
