"""S3's own body checksum, checked by the connector instead of botocore (``s3_checksum``).

The in-transit damage tests live with the other S3 faults in ``test_fsspec_s3.py``;
here: which checksum a response names, the piecewise check, and objects whose
checksum is not over their bytes (multipart) or absent.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import zlib
from types import SimpleNamespace
from typing import Any

import pytest

from lmcache_core import chunk_format, layout
from lmcache_core.storage_backend.connector import s3_checksum
from lmcache_core.storage_backend.connector.fsspec_connector import FsspecConnector
from tests.conftest import make_key
from tests.servers_s3 import S3Server
from tests.test_conformance import chunk


def _response(**headers: str) -> dict[str, Any]:
    return {"ResponseMetadata": {"HTTPHeaders": {f"x-amz-checksum-{k}": v for k, v in headers.items()}}}


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def test_the_response_names_the_checksum_to_check() -> None:
    crc = _b64(zlib.crc32(b"body").to_bytes(4, "big"))
    assert s3_checksum.expected_checksum(_response(crc32=crc)) == ("crc32", crc)
    sha = _b64(hashlib.sha256(b"body").digest())
    assert s3_checksum.expected_checksum(_response(sha256=sha)) == ("sha256", sha)
    # A multipart object's checksum is over its parts' checksums, not the body: not checkable.
    assert s3_checksum.expected_checksum(_response(crc32="AAAAAA==-3")) is None
    assert s3_checksum.expected_checksum({}) is None


def test_checksums_that_need_awscrt_are_checked_with_botocores_classes_when_it_is_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import botocore.httpchecksum

    class FakeCrc32c:  # stands in for botocore's CrtCrc32cChecksum
        def __init__(self) -> None:
            self.data = b""

        def update(self, chunk: Any) -> None:
            self.data += bytes(chunk)

        def digest(self) -> bytes:
            return hashlib.md5(self.data).digest()[:4]

    value = _b64(hashlib.md5(b"body").digest()[:4])
    monkeypatch.delitem(botocore.httpchecksum._CHECKSUM_CLS, "crc32c", raising=False)
    assert s3_checksum.expected_checksum(_response(crc32c=value)) is None  # botocore skips it too
    monkeypatch.setitem(botocore.httpchecksum._CHECKSUM_CLS, "crc32c", FakeCrc32c)
    expected = s3_checksum.expected_checksum(_response(crc32c=value))
    assert expected == ("crc32c", value)
    check = s3_checksum.BodyCheck(expected, "b/k")
    check.update(b"bo")
    check.update(b"dy")
    check.verify()
    check = s3_checksum.BodyCheck(expected, "b/k")
    check.update(b"bodY")
    with pytest.raises(s3_checksum.BodyChecksumError):
        check.verify()


@pytest.mark.parametrize("algorithm", ["crc32", "sha256", "sha1"])
def test_a_body_checked_in_pieces_matches_the_whole_and_one_flipped_bit_fails(algorithm: str) -> None:
    body = os.urandom(3 * 2**20 + 17)
    digest = zlib.crc32(body).to_bytes(4, "big") if algorithm == "crc32" else hashlib.new(algorithm, body).digest()
    check = s3_checksum.BodyCheck((algorithm, _b64(digest)), "bucket/chunk")
    view = memoryview(body)
    for start in range(0, len(body), 65536 + 3):  # uneven pieces, as a socket gives them
        check.update(view[start : start + 65536 + 3])
    check.verify()
    damaged = bytearray(body)
    damaged[len(body) // 2] ^= 0x10
    check = s3_checksum.BodyCheck((algorithm, _b64(digest)), "bucket/chunk")
    check.update(damaged)
    with pytest.raises(s3_checksum.BodyChecksumError, match=f"bucket/chunk: .*{algorithm}") as info:
        check.verify()
    assert isinstance(info.value, OSError)  # a transport failure: retried, not a corrupt chunk


def test_a_garbled_checksum_header_fails_the_body() -> None:
    check = s3_checksum.BodyCheck(("crc32", "not base64!"), "bucket/chunk")
    check.update(b"body")
    with pytest.raises(s3_checksum.BodyChecksumError):
        check.verify()


class _Events:
    def __init__(self) -> None:
        self.handlers: list[tuple[str, Any, str]] = []

    def register(self, name: str, handler: Any, unique_id: str) -> None:
        self.handlers.append((name, handler, unique_id))


class _Client:
    def __init__(self, validation: str) -> None:
        self.meta = SimpleNamespace(config=SimpleNamespace(response_checksum_validation=validation), events=_Events())


class _RegionalFs:
    """s3fs with ``cache_regions``: a bucket's requests go through a client of its own."""

    def __init__(self, validation: str = "when_required") -> None:
        self.s3 = _Client(validation)
        self.regional = _Client(validation)

    async def set_session(self) -> Any:
        return self.s3

    async def get_s3(self, bucket: str) -> Any:
        return self.regional


def test_the_client_that_sends_the_get_is_the_one_hooked_once() -> None:
    fs = _RegionalFs()
    assert asyncio.run(s3_checksum.ask_for_checksums(fs, "bucket")) is True
    assert asyncio.run(s3_checksum.ask_for_checksums(fs, "bucket")) is True
    assert [h[0] for h in fs.regional.meta.events.handlers] == ["before-sign.s3.GetObject"]
    assert fs.s3.meta.events.handlers == []
    # botocore validating by the user's choice: it keeps the job, and nothing is hooked.
    theirs = _RegionalFs("when_supported")
    assert asyncio.run(s3_checksum.ask_for_checksums(theirs, "bucket")) is False
    assert theirs.regional.meta.events.handlers == []


def test_the_hook_asks_once_and_never_into_a_presigned_url() -> None:
    from botocore.awsrequest import AWSRequest

    request = AWSRequest(method="GET", url="http://s3/bucket/key")
    s3_checksum._checksum_mode_header(request)
    s3_checksum._checksum_mode_header(request)  # a user's ChecksumMode, or a retry
    assert request.headers.get_all("x-amz-checksum-mode") == ["ENABLED"]
    presign = AWSRequest(method="GET", url="http://s3/bucket/key")
    presign.context["is_presign_request"] = True
    s3_checksum._checksum_mode_header(presign)
    assert "x-amz-checksum-mode" not in presign.headers


def test_the_fast_crc32_is_zlib_ng_and_agrees_with_zlib() -> None:
    from zlib_ng import zlib_ng  # the s3 and test extras install it

    assert s3_checksum._crc32 is zlib_ng.crc32
    data = os.urandom(1 << 20)
    for start in (0, 1, 4095, 1 << 19):
        assert s3_checksum._crc32(data[start:], 0x1234) == zlib.crc32(data[start:], 0x1234)


def test_botocore_is_told_to_leave_get_checks_to_us_unless_it_is_too_old_to_know_the_option(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from botocore.config import Config

    assert s3_checksum.config_defaults() == {"response_checksum_validation": "when_required"}
    older = {k: v for k, v in Config.OPTION_DEFAULTS.items() if k != "response_checksum_validation"}
    monkeypatch.setattr(Config, "OPTION_DEFAULTS", older)
    assert s3_checksum.config_defaults() == {}  # Config(**it) would raise on an unknown option


def _connector(server: S3Server, prefix: str) -> FsspecConnector:
    return FsspecConnector(server.url(prefix), timeout=5.0, **server.options)


def test_multipart_and_unchecksummed_objects_read_without_a_transport_check(s3_server: S3Server) -> None:
    prefix = "t-s3-checksum-multipart"
    conn = _connector(s3_server, prefix)
    client = s3_server.client()
    # botocore adds a CRC32 to every PUT by default; this client sends none.
    bare = s3_server.client(request_checksum_calculation="when_required")
    multipart, plain = make_key("multipart"), make_key("no-checksum")
    blob = chunk_format.encode_bytes(chunk(1, (12, 2, 128, 8, 128)), multipart.to_string())  # 6 MiB
    assert len(blob) > 5 * 2**20  # two parts: S3's smallest part (but the last) is 5 MiB
    try:
        name = f"{prefix}/{layout.key_to_path(multipart)}"
        upload = client.create_multipart_upload(Bucket=s3_server.bucket, Key=name, ChecksumAlgorithm="CRC32")
        parts = []
        for number, start in enumerate((0, 5 * 2**20), start=1):
            part = client.upload_part(
                Bucket=s3_server.bucket,
                Key=name,
                UploadId=upload["UploadId"],
                PartNumber=number,
                Body=blob[start : start + 5 * 2**20],
                ChecksumAlgorithm="CRC32",
            )
            parts.append({"PartNumber": number, "ETag": part["ETag"], "ChecksumCRC32": part["ChecksumCRC32"]})
        client.complete_multipart_upload(
            Bucket=s3_server.bucket, Key=name, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
        )
        assert "-" in _sent_checksum(client, s3_server.bucket, name)  # the case under test: parts' checksums
        got = conn.get(multipart)
        assert got is not None and bytes(got) == blob
        small = chunk_format.encode_bytes(chunk(2), plain.to_string())
        plain_name = f"{prefix}/{layout.key_to_path(plain)}"
        bare.put_object(Bucket=s3_server.bucket, Key=plain_name, Body=small)
        assert _sent_checksum(client, s3_server.bucket, plain_name) is None
        assert conn.get_many([plain, multipart]) == [small, blob]
    finally:
        conn.close()
        client.close()
        bare.close()


def _sent_checksum(client: Any, bucket: str, name: str) -> str | None:
    """The CRC32 a checksum-mode GET of ``name`` carries (botocore checks a whole-body one)."""
    response = client.get_object(Bucket=bucket, Key=name, ChecksumMode="ENABLED")
    response["Body"].close()
    value: str | None = response.get("ChecksumCRC32")
    return value
