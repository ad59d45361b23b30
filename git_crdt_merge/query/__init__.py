"""Read-side use cases: verify a state, diff two states or two models, show, log."""
