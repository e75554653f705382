"""The `mesh-llm` command: the one place that knows every service."""
