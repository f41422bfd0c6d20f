"""Execution of a plan and the event stream it reports."""
