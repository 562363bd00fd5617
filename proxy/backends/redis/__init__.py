"""Redis: the wire protocol, the shared rate limiter and the remote read cache."""

from proxy.backends.redis.cache_link import RemoteState
from proxy.backends.redis.limiter import RedisLimiter, RedisUnavailable
from proxy.backends.redis.remote_cache import RedisCache

__all__ = ["RedisCache", "RedisLimiter", "RedisUnavailable", "RemoteState"]
