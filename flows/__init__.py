"""Prefect flows, one per pipeline stage; each is thin and calls the sra2 library."""

import os

# The temporary local server's telemetry heartbeat collides with its own SQLite writes and logs
# "database is locked" tracebacks; it sends nothing we need, so it is off unless asked for.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A Prefect server that stops answering must cost seconds, not minutes: by default its client
# retries a failed request 5 times with back-off (2 + 4 + ... + 32 s: about a minute a call) and
# waits 60 s for an answer, and the flow engine's own calls (the final state) use the same client.
# One retry (2 s) rides out a passing 503; a stage whose API calls fail anyway goes on without
# them (flows.harness.monitor), so a lower budget costs at most part of the UI, never the work.
os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "1")
os.environ.setdefault("PREFECT_API_REQUEST_TIMEOUT", "20")
