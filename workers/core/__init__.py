"""The pure engine: KV block manager, scheduler, requests, the engine step. No I/O, no clocks."""
