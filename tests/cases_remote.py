"""Remote backend cases for the conformance suite: fsspec ones (S3, memory://,
file://) from ``cases_fsspec.py``, Redis ones from ``cases_redis.py``."""

from tests.backend_cases import BackendCase

REMOTE_CASES: list[BackendCase] = []
try:
    from tests.cases_fsspec import FSSPEC_CASES

    REMOTE_CASES += FSSPEC_CASES
except ImportError:
    pass
try:
    from tests.cases_redis import REDIS_CASES

    REMOTE_CASES += REDIS_CASES
except ImportError:
    pass
