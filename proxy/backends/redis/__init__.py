"""Redis: the wire protocol, the shared rate limiter and the remote read cache."""
