"""MongoDB backend: one MongoDB collection per collection, through PyMongo's asyncio API."""

from proxy.backends.mongo.backend import MongoBackend, database_of

__all__ = ["MongoBackend", "database_of"]
