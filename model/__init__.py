"""GR3D: architecture, region insertion, data loading from shards, trainer, evaluator."""
