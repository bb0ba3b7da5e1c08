"""Helpers only the tests use (the builders of tiny models, LoRA files and servers are in testkit/)."""
