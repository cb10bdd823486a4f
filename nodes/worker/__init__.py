"""The worker process: torch training and evaluation, preprocessing cache, site-kept state; no HTTP."""
