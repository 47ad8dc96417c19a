"""Traffic shaping for mta_client: per-path limits shared by every sender node.

Limits are counted per egress path, ``source->site`` (the source IP and the
destination site of :class:`mta_client.mx.Destination`), plus a provider
scope ``source->provider:<name>`` shared by all sites of one provider (see
``docs``: shaping-providers). Modules, from the inside out:

* :mod:`~mta_client.shaping.gcra`, :mod:`~mta_client.shaping.leases`: the
  algorithms (GCRA rates, lease semaphores), pure;
* :mod:`~mta_client.shaping.rules`: the ``shaping`` and ``redis`` config
  sections and :meth:`ShapingConfig.limits_for`, pure;
* :mod:`~mta_client.shaping.backend`: decisions and the backend interface;
* :mod:`~mta_client.shaping.memory`, :mod:`~mta_client.shaping.redis_backend`:
  the two backends (trio's clock; Redis's clock in Lua);
* :mod:`~mta_client.shaping.shaper`: :class:`Shaper`, what the daemon uses,
  with the fallback to local shares when Redis is unreachable.
"""

from mta_client.shaping.backend import (
    LEASE_RETRY_HINT,
    Lease,
    RefusalReason,
    Refused,
    ShapingBackend,
    Suspension,
)

# ``gcra`` the function is not re-exported: it would hide the module of that name.
from mta_client.shaping.gcra import GcraDecision, Rate, default_burst
from mta_client.shaping.memory import MemoryBackend
from mta_client.shaping.redis_backend import REDIS_DOWN, RedisBackend
from mta_client.shaping.rules import (
    BUILTIN_PROVIDERS,
    DEFAULT_KNOBS,
    DEFAULT_LEASE_TTL,
    DEFAULT_THROTTLE,
    Knobs,
    PathLimits,
    Provider,
    RedisConfig,
    Scope,
    ShapingConfig,
    SourceRules,
    ThrottleRule,
    parse_rate,
    parse_redis,
    parse_shaping,
)
from mta_client.shaping.shaper import Mode, Shaper, default_node_id, open_shaper

__all__ = [
    "BUILTIN_PROVIDERS",
    "DEFAULT_KNOBS",
    "DEFAULT_LEASE_TTL",
    "DEFAULT_THROTTLE",
    "LEASE_RETRY_HINT",
    "REDIS_DOWN",
    "GcraDecision",
    "Knobs",
    "Lease",
    "MemoryBackend",
    "Mode",
    "PathLimits",
    "Provider",
    "Rate",
    "RedisBackend",
    "RedisConfig",
    "RefusalReason",
    "Refused",
    "Scope",
    "Shaper",
    "ShapingBackend",
    "ShapingConfig",
    "SourceRules",
    "Suspension",
    "ThrottleRule",
    "default_burst",
    "default_node_id",
    "open_shaper",
    "parse_rate",
    "parse_redis",
    "parse_shaping",
]
