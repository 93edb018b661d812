"""lmcache toolkit core: a KV-cache chunk store for LLM serving.

Importing this package is cheap: torch is imported only by the modules that
move tensors (``chunk_format`` decoders, ``storage_backend``).
"""

from lmcache_core.config import LMCacheEngineConfig, LMCacheEngineMetadata, LMCacheMemPoolMetadata
from lmcache_core.key import CacheEngineKey, chunk_hashes

__version__ = "0.1.0"

__all__ = [
    "CacheEngineKey",
    "LMCacheEngineConfig",
    "LMCacheEngineMetadata",
    "LMCacheMemPoolMetadata",
    "__version__",
    "chunk_hashes",
]
