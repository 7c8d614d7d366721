"""The goodput planner: a pure decision core (``core.py``) fed by observations and a fitted
performance model, and the adapter that reads etcd and writes targets (``adapter.py``)."""
