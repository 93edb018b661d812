"""Remote backend cases for the conformance suite: fsspec ones (S3, memory://,
file://) from ``cases_fsspec.py``, Redis ones from ``cases_redis.py``."""

from importlib.util import find_spec

from tests.backend_cases import BackendCase

REMOTE_CASES: list[BackendCase] = []
if find_spec("tests.cases_fsspec"):
    from tests.cases_fsspec import FSSPEC_CASES

    REMOTE_CASES += FSSPEC_CASES
if find_spec("tests.cases_redis"):
    from tests.cases_redis import REDIS_CASES

    REMOTE_CASES += REDIS_CASES
