"""The worker process: its job loop and typed protocol with the server, torch training and evaluation,
preprocessing cache, site-kept state; no HTTP."""
