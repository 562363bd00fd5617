"""The async Python client of dbproxy: ``from proxy.client import Client, DbProxyError``."""

from proxy.client.client import Client, Collection, Transaction
from proxy.client.errors import (
    BadRequest,
    CommitOutcomeUnknown,
    Conflict,
    DbProxyError,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    RateLimited,
    ServerError,
    Timeout,
    Unauthorized,
    Unavailable,
    Unprocessable,
)

__all__ = [
    "BadRequest",
    "Client",
    "Collection",
    "CommitOutcomeUnknown",
    "Conflict",
    "DbProxyError",
    "Forbidden",
    "NotFound",
    "PayloadTooLarge",
    "PreconditionFailed",
    "RateLimited",
    "ServerError",
    "Timeout",
    "Transaction",
    "Unauthorized",
    "Unavailable",
    "Unprocessable",
]
