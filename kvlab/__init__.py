"""kvlab: shared wire-level pieces (tokenizer, chat template, block hashes, OpenAI protocol) and the CLI."""
