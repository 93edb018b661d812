"""Real servers for the tests, started on free loopback ports and stopped at the end.

S3 (moto's ThreadedMotoServer) fixtures live in ``servers_s3.py``; redis-server and
Redis Cluster fixtures in ``servers_redis.py``. conftest imports everything here.
A module that exists but fails to import fails the run (never silently skipped).
"""

from importlib.util import find_spec

if find_spec("tests.servers_s3"):
    from tests.servers_s3 import *  # noqa: F401,F403
if find_spec("tests.servers_redis"):
    from tests.servers_redis import *  # noqa: F401,F403
