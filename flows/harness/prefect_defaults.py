"""Prefect settings this project changes, as environment defaults (a variable already set wins).

Prefect reads its settings once, when it is first imported, so every module of flows/ that imports
prefect imports this one at its top, before it: all of them import prefect inside functions except
flows.pipeline, which imports this first. Environment variables, not a prefect.toml: Prefect reads
that file from the working directory only, and the stages, the ``sra2`` command and the tests do
not all start in the repository; the variables also reach the servers and stages started from
here.
"""

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
