"""S3's own checksum of a GET's body, checked with a fast CRC32.

S3 keeps the CRC32 that botocore sends with every PUT and returns it on a GET
that asks for it (``x-amz-checksum-mode: ENABLED``). By default botocore asks,
then checks the body as it arrives with ``binascii.crc32``: ~8 ms per 32 MiB on
the event loop thread, during which that thread serves no other GET of a batch
(profiled on a 2-core VM: what kept a batch of sixteen 32 MiB GETs under 2x
sequential ones).

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

#: Checksums S3 may return that we compute (crc32c and crc64nvme need awscrt;
#: botocore skips those too when it is missing). Objects we write carry crc32.
ALGORITHMS = ("crc32", "sha256", "sha1")
_HOOK_ID = "lmcache-checksum-mode"
_VALIDATION_OPTION = "response_checksum_validation"
# Clients that have our hook, so their GETs are ours to check.
_hooked: weakref.WeakSet[Any] = weakref.WeakSet()

try:  # zlib-ng folds CRC32 with carry-less multiplies: ~1.4 ms per 32 MiB, zlib ~8 ms
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # the s3 extra installs it; zlib's values are the same
    from zlib import crc32 as _crc32


class BodyChecksumError(OSError):
    """A body does not match the checksum S3 sent with it: damaged in transit (retry)."""


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


async def ask_for_checksums(fs: Any) -> bool:
    """Make ``fs``'s client ask S3 for checksums on GETs; whether we check them.

    False when botocore validates GETs itself (a user's ``config_kwargs`` set
    ``response_checksum_validation="when_supported"``): checking twice buys nothing.
    Runs on ``fs``'s event loop; cheap after the first call per client.
    """
    client = await fs.set_session()
    if client in _hooked:
        return True
    if getattr(client.meta.config, _VALIDATION_OPTION, None) == "when_supported":
        return False
    client.meta.events.register("before-sign.s3.GetObject", _checksum_mode_header, unique_id=_HOOK_ID)
    _hooked.add(client)
    return True


def _checksum_mode_header(request: Any, **_: Any) -> None:
    # before-sign: the header is added before SigV4 signs the request's headers.
    request.headers["x-amz-checksum-mode"] = "ENABLED"


def expected_checksum(response: dict[str, Any]) -> tuple[str, bytes] | None:
    """``(algorithm, digest)`` S3 sent for a GET's whole body, or None.

    None for objects stored without one and for multipart objects, whose
    checksum (``...-N``) is over their parts' checksums, not the body's bytes.
    """
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    for algorithm in ALGORITHMS:
        value = headers.get(f"x-amz-checksum-{algorithm}")
        if value and "-" not in value:
            return algorithm, base64.b64decode(value)
    return None


class _Crc32:
    """``hashlib``'s update/digest over a CRC32 function."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = _crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


class BodyCheck:
    """S3's checksum of one body, fed its pieces in order as they arrive.

    Not thread-safe (one coroutine reads one body).
    """

    def __init__(self, expected: tuple[str, bytes]) -> None:
        self.algorithm, self._digest = expected
        self._state: Any = _Crc32() if self.algorithm == "crc32" else hashlib.new(self.algorithm)

    def update(self, piece: Any) -> None:
        self._state.update(piece)

    def verify(self) -> None:
        """Raise ``BodyChecksumError`` unless the pieces fed match S3's checksum."""
        if self._state.digest() != self._digest:
            raise BodyChecksumError(f"S3 body does not match its {self.algorithm}: damaged in transit")
