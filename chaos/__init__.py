"""``make chaos``: real processes on loopback, faults injected under a steady mixed load.

Each scenario starts its own servers (a private ``redis-server``, a SecantusDB server with
on-disk storage, an SMTP sink, a webhook receiver) and ``taskmanager`` processes, runs the load
generator of :mod:`chaos.load` (several users creating, updating and completing tasks through
the HTTP API, and new users registering), injects one fault, and then checks the ledger: every
acknowledged write's side effects (welcome emails, webhooks, search entries) arrived exactly
once. :mod:`chaos.report` writes ``RELIABILITY.md``.

The process helpers are the end-to-end suite's (``tests/e2e/helpers.py``,
``tests/e2e/test_pipeline.py``), so the suite and this runner start processes the same way.
"""
