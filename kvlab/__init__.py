"""kvlab's top and bottom: shared wire code (wire/, floor 0); the launcher (floor 5); the CLI and bundled specs
(floor 7)."""
