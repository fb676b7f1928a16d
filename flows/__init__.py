"""Prefect flows, one per pipeline stage; each is thin and calls the sra2 library."""

import os

# The temporary local server's telemetry heartbeat collides with its own SQLite writes and logs
# "database is locked" tracebacks; it sends nothing we need, so it is off unless asked for.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
