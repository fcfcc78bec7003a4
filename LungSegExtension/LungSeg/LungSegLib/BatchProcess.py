"""One run of the core's batch command, `lungseg segment ... --progress-lines`, in a child process.

A reader thread parses the `lungseg-progress I/N STATUS PATH` lines, so the caller only polls (the panel does, from
a QTimer). Cancel returns at once: it interrupts the whole process group, which lets the core finish cleanly, and
kills what is left after a grace period. The core writes every output atomically (a hidden temporary file renamed
into place), so no half-written output remains; a killed run's temporary file is deleted here.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

PROGRESS_LINE = re.compile(r"^lungseg-progress (\d+)/(\d+) (\S+) (.*)$")
INTERRUPT_GRACE_SECONDS = 3.0


class BatchProcess:
    def __init__(self, args: list[str], environment: dict | None = None, outputDir: str | Path | None = None):
        self.args = [str(a) for a in args]
        self.environment = environment
        self.outputDir = Path(outputDir) if outputDir else None
        self.done = self.total = self.failed = self.skipped = self.toCheck = 0
        self.lastInput = ""
        self.log: list[str] = []
        self.returnCode: int | None = None
        self.cancelled = False
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._tableBefore = None

    def start(self) -> None:
        self._tableBefore = self._tableStamp()  # an earlier run's results.csv is no proof that this one ended
        if os.name == "nt":
            group = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
        else:
            group = {"start_new_session": True}  # PythonSlicer is a launcher: cancel must reach its child too
        self._process = subprocess.Popen(
            self.args,
            env=self.environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            errors="replace",
            **group,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._process.stdout:
            self._parse(line.rstrip("\r\n"))
        code = self._process.wait()
        if self.cancelled:
            self._removeTemporaryFiles()
        with self._lock:
            self.returnCode = code

    def _parse(self, line: str) -> None:
        match = PROGRESS_LINE.match(line)
        with self._lock:
            self.log.append(line)
            if match:
                self.done, self.total = int(match.group(1)), int(match.group(2))
                self.failed += match.group(3) == "error"
                self.skipped += match.group(3) == "skipped"  # a non-image DICOM object: not a failure
                self.toCheck += match.group(3) == "check"  # segmented, and flagged by QC
                self.lastInput = match.group(4)

    @property
    def running(self) -> bool:
        return self._process is not None and self.returnCode is None

    def progress(self) -> tuple[int, int, int, str]:
        """(inputs done, inputs in all, failed so far, last input) as of the last progress line."""
        with self._lock:
            return self.done, self.total, self.failed, self.lastInput

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the end of the run (and of its output); returns the exit status."""
        self._process.wait(timeout)
        self._reader.join(timeout)
        return self.returnCode

    def flaggedInFolder(self) -> tuple[int, int] | None:
        """(results flagged by QC, results segmented) over the output folder's `results.csv`, which the core
        rewrites at the end of a run from every finished input there (earlier runs too), as its review page does;
        None before there is one."""
        table = self.outputDir / "results.csv" if self.outputDir else None
        if table is None or not table.is_file():
            return None
        with open(table, newline="", encoding="utf-8") as f:
            segmented = [row for row in csv.DictReader(f) if row.get("status") == "ok"]
        return sum(row.get("qc") == "check" for row in segmented), len(segmented)

    def _tableStamp(self):
        table = self.outputDir / "results.csv" if self.outputDir else None
        if table is None or not table.is_file():
            return None
        stat = table.stat()
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def ranToEnd(self) -> bool:
        """The core's exit status: 0 all segmented, 1 some inputs failed (results.csv written), 2 usage error,
        3 crash, 130 interrupted. A crash can exit 1 too (an exception that escapes Python), so 1 counts only
        with a results.csv that this run wrote."""
        if self.returnCode == 0:
            return True
        stamp = self._tableStamp()
        return self.returnCode == 1 and stamp is not None and stamp != self._tableBefore

    def failureReason(self) -> str:
        """The child's last non-empty output line (a traceback's last line, `lungseg: error: ...`), and the
        signal that ended it, if one did."""
        lines = [line.strip() for line in self.log if line.strip()]
        last = lines[-1] if lines else ""
        code = self.returnCode
        if code is not None and code < 0:  # POSIX: ended by a signal
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"killed by {name}" + (f"; last output: {last}" if last else "")
        return last or f"exit status {code}"

    def cancel(self) -> None:
        """Stop the run; returns at once (`wait()` for the end)."""
        if self._process is None or self._process.poll() is not None:
            return
        self.cancelled = True
        if os.name == "nt":
            # taskkill is a console program: without this flag it flashes a console window over Slicer
            subprocess.run(
                ["taskkill", "/F", "/T", "/PID", str(self._process.pid)],
                capture_output=True,
                creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
            )
            return
        os.killpg(self._process.pid, signal.SIGINT)  # KeyboardInterrupt: the core stops between two steps
        threading.Thread(target=self._killAfterGrace, daemon=True).start()

    def _killAfterGrace(self) -> None:
        # the output closes when the last process of the group has ended
        self._reader.join(INTERRUPT_GRACE_SECONDS)
        if self._reader.is_alive():
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _removeTemporaryFiles(self) -> None:
        """A killed run can leave the core's hidden `.NAME.XXXXXXXX.partial.EXT` file; never a visible output."""
        if self.outputDir and self.outputDir.is_dir():
            for leftover in self.outputDir.rglob(".*.partial*"):
                leftover.unlink(missing_ok=True)
