"""Architecture search: zero-cost proxies, the Optuna study and the per-trial objective."""
