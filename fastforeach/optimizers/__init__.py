"""One module per optimizer: its step rules (declared with `rules.declare`), their fused forms, and its
`ForEachOptimizer` class; `registry.py` lists them."""
