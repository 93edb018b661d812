"""Real servers for the tests, started on free loopback ports and stopped at the end.

S3 (moto's ThreadedMotoServer) fixtures live in ``servers_s3.py``; redis-server and
Redis Cluster fixtures in ``servers_redis.py``. conftest imports everything here.
"""

try:
    from tests.servers_s3 import *  # noqa: F401,F403
except ImportError:
    pass
try:
    from tests.servers_redis import *  # noqa: F401,F403
except ImportError:
    pass
