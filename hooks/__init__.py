"""Hook scripts that `git crdt install` places in a clone (package data)."""
