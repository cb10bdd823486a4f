"""The service layer: typed messages in and out, role checks, store, ledger, executor; no HTTP."""
