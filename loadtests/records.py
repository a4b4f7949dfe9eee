"""Raw per-request records as JSON lines: the Locust process writes them, the sweep reads them.

A line with ``"event": "start"`` opens a run (its wall-clock start and schedule); every other line is
one request (see llm_measure.record). Appending whole lines keeps a partly written file readable while
the run is still going, which is how the sweep shows progress.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class RecordWriter:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab", buffering=0)  # unbuffered: readers see whole lines at once

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(_encode(record) + b"\n")

    def close(self) -> None:
        self._file.close()


def read_records(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the last start header or {}, the request records after it); a torn last line is skipped."""
    header: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    p = Path(path)
    if not p.exists():
        return header, rows
    for line in p.read_bytes().splitlines():
        try:
            row = _decode(line)
        except msgspec.DecodeError:
            continue  # the writer is mid-line
        event = row.get("event")
        if event == "start":
            header, rows = row, []
        elif event is not None:
            header = {**header, event: row}   # e.g. "end": the dispatcher's totals
        else:
            rows.append(row)
    return header, rows


class RecordReader:
    """read_records for a file still being written, reading only what was appended since last time:
    a sweep polls every second, and a rate's records grow to thousands of requests with their gaps."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offset = 0
        self.header: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []

    def read(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        if not self.path.exists():
            return self.header, self.rows
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1      # whole lines only: the writer may be mid-line
        self.offset += end
        for line in data[:end].splitlines():
            try:
                row = _decode(line)
            except msgspec.DecodeError:
                continue
            event = row.get("event")
            if event == "start":
                self.header, self.rows = row, []
            elif event is not None:
                self.header = {**self.header, event: row}
            else:
                self.rows.append(row)
        return self.header, self.rows
