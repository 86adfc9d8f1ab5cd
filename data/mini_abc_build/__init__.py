"""Build pieces of mini-AbC, a CPU-scale AbC benchmark made from real emoji images."""
