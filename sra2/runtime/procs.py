"""What Linux's /proc says about a process: its parent, session, command line, start time and
memory.

Used to tell a live process from a later one that reuses its pid (workers watching their
launchers, records of running stages) and to find the dvc process above a stage. Where /proc
cannot be read, each function says what it can without it.
"""

from __future__ import annotations

import contextlib
import os
from datetime import datetime
from pathlib import Path


def stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (proc(5): [0] state, [1] ppid, ..., [19] start time), None
    when there is no such process; OSError where /proc cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None


def parent(pid: int) -> int | None:
    """The parent of ``pid``; None when it is gone or /proc cannot say."""
    with contextlib.suppress(OSError):
        fields = stat(pid)
        return int(fields[1]) if fields else None
    return None


def cmdline(pid: int) -> list[str]:
    """The command line of ``pid`` ([] when it is gone or cannot be read)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def ancestors(pid: int) -> list[int]:
    """The processes above ``pid``, nearest first, up to (not including) init."""
    found, pid = [], parent(pid)
    while pid and pid > 1 and pid not in found:
        found.append(pid)
        pid = parent(pid)
    return found


def session(sid: int) -> list[int]:
    """The live processes of session ``sid`` (those a process started with start_new_session=True
    and their descendants, unless they made sessions of their own); zombies are left out."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError, TypeError):
            fields = stat(int(entry.name))
            if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found


def started_at(pid: int) -> str | None:
    """A token of process ``pid`` that a later process reusing the pid does not share (its start
    time), or None when it is gone or a zombie. Without /proc: whether the pid exists."""
    try:
        fields = stat(pid)
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "alive"
    return None if fields is None or fields[0] in ("Z", "X") else fields[19]


def start_time(pid: int) -> datetime:
    """When process ``pid`` started (now, where /proc cannot say)."""
    try:
        fields = stat(pid)
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return datetime.fromtimestamp(boot + int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, StopIteration, TypeError, IndexError, ValueError):
        return datetime.now()


def memory(pid: int | str = "self") -> dict[str, int]:
    """A process's memory in bytes (smaps_rollup): rss, pss (shared pages divided among their
    users), private (pages no other process maps, page-cache pages included) and anonymous (not
    file-backed: what no page cache can hold)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        fields[key] = int(value.split()[0]) * 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"],
            "private": fields["Private_Clean"] + fields["Private_Dirty"],
            "anonymous": fields["Anonymous"]}
