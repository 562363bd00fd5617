"""Storage adapters: the only modules that import database drivers."""
