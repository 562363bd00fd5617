"""Resilience: circuit breakers, rate limits and replica routing; pure, clock injected."""
