"""Stand-in engine for bridge tests: fast, no model. Copied into the test bus's seed repository,
so it runs as a request's own code would."""
