"""What the tests and the benchmark use, never the runtime: the oracle harness against fastai, the published
reference implementations, spawned process worlds, and a tiny dataset with its models."""
