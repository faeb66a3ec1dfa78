"""The worker's side of the pipe to the driver, and the optional profiler."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


class Channel:
    """JSON lines to the driver on the original stdout; commands on stdin.

    Everything else the process prints (libraries, C++ logs) goes to stderr,
    which the driver writes to a log file.
    """

    def __init__(self):
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)

    def send(self, event: str, **fields):
        self._out.write(json.dumps({"event": event, **fields}) + "\n")
        self._out.flush()

    def wait(self) -> list[str]:
        if Profile.active:
            Profile.active.pause()
        line = sys.stdin.readline()
        if Profile.active:
            Profile.active.resume()
        if not line:
            raise SystemExit("driver went away")
        return line.split()


class Profile:
    """Optional profile of the timed rounds (not of the waits for the driver).

    `pyinstrument`: wall-clock sampling; writes the call tree (every frame)
    and a flat list by own time. `cprofile`: deterministic, timed with
    `time.process_time`, so time the process spends descheduled by other
    load on the machine is not counted; writes the top functions by
    cumulative and by own time.
    """

    active = None  # the profile the channel pauses while it waits

    def __init__(self, path: str | None, kind: str | None):
        self.path = path if kind else None
        self.kind = kind
        self.profiler = None
        self.running = False

    def start(self):
        if self.path and self.profiler is None:
            if self.kind == "cprofile":
                import cProfile

                self.profiler = cProfile.Profile(time.process_time)
            else:
                from pyinstrument import Profiler

                self.profiler = Profiler(interval=0.0005)
            Profile.active = self
            self.resume()

    def pause(self):
        if self.profiler is not None and self.running:
            (self.profiler.disable if self.kind == "cprofile" else self.profiler.stop)()
            self.running = False

    def resume(self):
        if self.profiler is not None and not self.running:
            (self.profiler.enable if self.kind == "cprofile" else self.profiler.start)()
            self.running = True

    def stop(self):
        if self.profiler is None:
            return
        self.pause()
        if self.kind == "cprofile":
            import io
            import pstats

            self.profiler.dump_stats(str(Path(self.path).with_suffix(".prof")))
            out = io.StringIO()
            stats = pstats.Stats(self.profiler, stream=out)
            stats.sort_stats("cumulative").print_stats(60)
            stats.sort_stats("tottime").print_stats(40)
            text = out.getvalue()
        else:
            tree = self.profiler.output_text(unicode=True, show_all=True)
            flat = self.profiler.output_text(unicode=True, show_all=True, flat=True)
            text = tree + "\n\nFLAT (own time)\n" + flat
        Path(self.path).write_text(text)
        self.profiler = None
        Profile.active = None
