"""Operations: worker heartbeats, "no live worker", /readyz and /metrics."""
