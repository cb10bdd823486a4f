"""voxgrid privacy: DP mechanisms, accountants, budget ledger, secure aggregation (imports nothing else of voxgrid)."""
