"""S3's own body checksum, checked by the connector instead of botocore (``s3_checksum``).

The in-transit damage tests live with the other S3 faults in ``test_fsspec_s3.py``;
here: which checksum a response names, the piecewise check, and objects whose
checksum is not over their bytes (multipart) or absent.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zlib
from typing import Any

import boto3
import pytest
from botocore.config import Config

from lmcache_core import chunk_format, layout
from lmcache_core.storage_backend.connector import s3_checksum
from lmcache_core.storage_backend.connector.fsspec_connector import FsspecConnector
from tests.conftest import make_key
from tests.servers_s3 import S3Server, _boto_options
from tests.test_conformance import chunk


def _response(**headers: str) -> dict[str, Any]:
    return {"ResponseMetadata": {"HTTPHeaders": {f"x-amz-checksum-{k}": v for k, v in headers.items()}}}


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def test_the_response_names_the_checksum_to_check() -> None:
    crc = zlib.crc32(b"body").to_bytes(4, "big")
    assert s3_checksum.expected_checksum(_response(crc32=_b64(crc))) == ("crc32", crc)
    sha = hashlib.sha256(b"body").digest()
    assert s3_checksum.expected_checksum(_response(sha256=_b64(sha))) == ("sha256", sha)
    # A multipart object's checksum is over its parts' checksums, not the body: not checkable.
    assert s3_checksum.expected_checksum(_response(crc32="AAAAAA==-3")) is None
    assert s3_checksum.expected_checksum(_response(crc32c=_b64(b"1234"))) is None  # needs awscrt
    assert s3_checksum.expected_checksum({}) is None


@pytest.mark.parametrize("algorithm", ["crc32", "sha256", "sha1"])
def test_a_body_checked_in_pieces_matches_the_whole_and_one_flipped_bit_fails(algorithm: str) -> None:
    body = os.urandom(3 * 2**20 + 17)
    digest = zlib.crc32(body).to_bytes(4, "big") if algorithm == "crc32" else hashlib.new(algorithm, body).digest()
    check = s3_checksum.BodyCheck((algorithm, digest))
    view = memoryview(body)
    for start in range(0, len(body), 65536 + 3):  # uneven pieces, as a socket gives them
        check.update(view[start : start + 65536 + 3])
    check.verify()
    damaged = bytearray(body)
    damaged[len(body) // 2] ^= 0x10
    check = s3_checksum.BodyCheck((algorithm, digest))
    check.update(damaged)
    with pytest.raises(s3_checksum.BodyChecksumError, match=algorithm) as info:
        check.verify()
    assert isinstance(info.value, OSError)  # a transport failure: retried, not a corrupt chunk


def test_the_fast_crc32_is_zlib_ng_and_agrees_with_zlib() -> None:
    zlib_ng = pytest.importorskip("zlib_ng.zlib_ng", reason="zlib-ng comes with the s3 and test extras")
    assert s3_checksum._crc32 is zlib_ng.crc32
    data = os.urandom(1 << 20)
    for start in (0, 1, 4095, 1 << 19):
        assert s3_checksum._crc32(data[start:], 0x1234) == zlib.crc32(data[start:], 0x1234)


def test_botocore_is_told_to_leave_get_checks_to_us() -> None:
    assert s3_checksum.config_defaults() == {"response_checksum_validation": "when_required"}


def _connector(server: S3Server, prefix: str) -> FsspecConnector:
    return FsspecConnector(server.url(prefix), timeout=5.0, **server.options)


def test_multipart_and_unchecksummed_objects_read_without_a_transport_check(s3_server: S3Server) -> None:
    prefix = "t-s3-checksum-multipart"
    conn = _connector(s3_server, prefix)
    client = s3_server.client()
    # botocore adds a CRC32 to every PUT by default; this client sends none.
    bare = boto3.client("s3", config=Config(request_checksum_calculation="when_required"), **_boto_options(s3_server))
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
