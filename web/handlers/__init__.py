"""HTTP handlers: thin adapters from requests to ``core`` functions."""
