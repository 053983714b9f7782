"""Studies built on the core: weight mixing, generation quality, the study runner."""
