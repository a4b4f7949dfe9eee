"""The workers the router knows: health, load and the KV-event subscription that feeds the index."""
