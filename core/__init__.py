"""What every mmkit command shares: model references, tasks and data, artifacts, the method
registry, the recipe engine, evaluate and profile."""
