"""Load harness: dbproxy sidecar vs a minimal aiohttp+asyncpg baseline (python -m benchmarks)."""
