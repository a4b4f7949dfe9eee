"""Shared wire-level pieces, the bottom floor: tokenizer and chat template, chained block hashes, KV
events, the OpenAI protocol and its HTTP error shapes, and user errors (one line naming the fix).
Imports nothing else of kvlab."""
