"""Dispatching: the store of jobs, the scheduler that runs them, and the dispatcher that
the HTTP surface calls."""
