"""voxgrid privacy: DP mechanisms, accountants, budget ledger, secure aggregation (imports nothing else of voxgrid).

Modules: :mod:`.spec` (the filter chain a plan asks for), :mod:`.mechanisms` (the filters, torch),
:mod:`.accountant` (epsilon, via Opacus), :mod:`.ledger` (SQLite record of releases and budgets),
:mod:`.records` (receipts and ledger views), :mod:`.report` (the owner's HTML/JSON report).
Importing this package does not load Opacus: the accountant imports it on first use.
"""

from .accountant import AccountingError
from .ledger import BudgetExceeded, Ledger, LedgerError
from .records import BudgetCheck, BudgetStatus, Estimate, LedgerEntry, LedgerView, Receipt, Refusal
from .spec import PrivacySpec, PrivacySpecError, TrainingContext

__all__ = ["AccountingError", "BudgetCheck", "BudgetExceeded", "BudgetStatus", "Estimate", "Ledger", "LedgerEntry", "LedgerError",
           "LedgerView", "PrivacySpec", "PrivacySpecError", "Receipt", "Refusal", "TrainingContext"]
