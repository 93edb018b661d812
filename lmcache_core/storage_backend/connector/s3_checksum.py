"""S3's own checksum of a GET's body, checked with a fast CRC32.

S3 keeps the CRC32 that botocore (1.36 and later) sends with every PUT and
returns it on a GET that asks for it (``x-amz-checksum-mode: ENABLED``); objects
written by an older client carry none, and only our xxh3 covers them. By
default botocore asks, then checks the body as it arrives with
``binascii.crc32``: ~8 ms per 32 MiB on the event loop thread, during which that
thread serves no other GET of a batch (profiled on a 2-core VM: what kept a
batch of sixteen 32 MiB GETs under 2x sequential ones).

The check stays: our own xxh3 covers the tensor's bytes but not the header that
says what they are, so a header damaged in transit could still parse. We only
make it cheaper: the connector sets botocore's validation to ``when_required``,
``ask_for_checksums`` adds the header with an event hook (botocore validates
whenever the ``ChecksumMode`` parameter is passed, so the parameter cannot be
used), and ``BodyCheck`` checks the pieces with zlib-ng's CRC32 (~1.4 ms per
32 MiB; zlib's when zlib-ng is not installed). Computing it on executor threads
instead was measured too: no faster than inline once the CRC is this cheap.
"""

from __future__ import annotations

import base64
import hashlib
import weakref
from typing import Any

#: The checksums S3 may send, in botocore's order of preference. It sends the one
#: the object was stored with; objects we write carry crc32.
ALGORITHMS = ("xxhash128", "xxhash3", "xxhash64", "crc64nvme", "crc32c", "crc32", "sha1", "sha256")
_HOOK_ID = "lmcache-checksum-mode"
_VALIDATION_OPTION = "response_checksum_validation"
# Clients that have our hook, so their GETs are ours to check.
_hooked: weakref.WeakSet[Any] = weakref.WeakSet()

try:  # zlib-ng folds CRC32 with carry-less multiplies: ~1.4 ms per 32 MiB, zlib ~8 ms
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # the s3 extra installs it; zlib's values are the same
    from zlib import crc32 as _crc32


class BodyChecksumError(OSError):
    """A body does not match the checksum S3 sent with it: damaged in transit (retried)."""


def config_defaults() -> dict[str, Any]:
    """botocore ``Config`` options that leave the GET check to ``BodyCheck``.

    Empty for a botocore older than 1.36, which does not know the option and
    checks a GET only when asked by parameter (never, here).
    """
    try:
        from botocore.config import Config
    except ImportError:
        return {}
    if _VALIDATION_OPTION not in getattr(Config, "OPTION_DEFAULTS", {}):
        return {}
    return {_VALIDATION_OPTION: "when_required"}


async def ask_for_checksums(fs: Any, bucket: str) -> bool:
    """Make the client ``fs`` uses for ``bucket`` ask S3 for checksums on GETs.

    Returns whether the caller checks them: False when botocore validates GETs
    itself (a user's ``config_kwargs`` set ``response_checksum_validation=
    "when_supported"``), as checking twice buys nothing. With ``cache_regions``,
    s3fs sends a bucket's requests through a regional client of its own: that is
    the one hooked. Runs on ``fs``'s event loop; cheap after the first call per client.
    """
    await fs.set_session()
    get_s3 = getattr(fs, "get_s3", None)
    client = await get_s3(bucket) if get_s3 is not None else fs.s3
    if client in _hooked:
        return True
    if getattr(client.meta.config, _VALIDATION_OPTION, None) == "when_supported":
        return False
    client.meta.events.register("before-sign.s3.GetObject", _checksum_mode_header, unique_id=_HOOK_ID)
    _hooked.add(client)
    return True


def _checksum_mode_header(request: Any, **_: Any) -> None:
    # before-sign: added before SigV4 signs the request's headers. Not twice (the
    # headers are an email.Message: setting appends), and not into presigned URLs.
    if request.context.get("is_presign_request") or "x-amz-checksum-mode" in request.headers:
        return
    request.headers["x-amz-checksum-mode"] = "ENABLED"


def expected_checksum(response: dict[str, Any]) -> tuple[str, str] | None:
    """``(algorithm, base64 digest)`` S3 sent for a GET's whole body, or None.

    None for objects stored without one, for multipart objects, whose checksum
    (``...-N``) is over their parts' checksums, not the body's bytes, and for
    algorithms that need awscrt when it is not installed (botocore skips those too).
    """
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    for algorithm in ALGORITHMS:
        value = headers.get(f"x-amz-checksum-{algorithm}")
        if value and "-" not in value and _new_state(algorithm) is not None:
            return algorithm, value
    return None


class _Crc32:
    """``hashlib``'s update/digest over a CRC32 function."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = _crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


def _new_state(algorithm: str) -> Any:
    """A fresh update/digest object for ``algorithm``, or None if we cannot compute it."""
    if algorithm == "crc32":
        return _Crc32()
    if algorithm in ("sha1", "sha256"):
        return hashlib.new(algorithm)
    try:  # crc32c, crc64nvme, xxhash*: botocore's own classes, present when awscrt is
        from botocore.httpchecksum import _CHECKSUM_CLS
    except ImportError:
        return None
    cls = _CHECKSUM_CLS.get(algorithm)
    return cls() if cls is not None else None


class BodyCheck:
    """S3's checksum of one body, fed its pieces in order as they arrive.

    Args:
        expected: from ``expected_checksum``.
        where: the object, for the error message.

    Not thread-safe (one coroutine reads one body).
    """

    def __init__(self, expected: tuple[str, str], where: str) -> None:
        self.algorithm, self._value = expected
        self._where = where
        self._state: Any = _new_state(self.algorithm)

    def update(self, piece: Any) -> None:
        self._state.update(piece)

    def verify(self) -> None:
        """Raise ``BodyChecksumError`` unless the pieces fed match S3's checksum."""
        try:
            digest = base64.b64decode(self._value, validate=True)
        except ValueError:  # binascii.Error: a garbled header is a damaged reply too
            digest = b""
        if self._state.digest() != digest:
            raise BodyChecksumError(f"{self._where}: body does not match S3's {self.algorithm}: damaged in transit")
