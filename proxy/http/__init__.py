"""HTTP layer: the only place aiohttp server code is imported."""
