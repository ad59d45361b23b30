"""What git runs and the wiring of a clone: merge driver, hooks, install, clone (no torch)."""
