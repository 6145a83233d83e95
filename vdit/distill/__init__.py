"""`vdit distill`: few-step students of trained runs (vdit/distill/setup.py)."""
