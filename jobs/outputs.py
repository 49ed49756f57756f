"""An output folder that the bulk jobs (generate, score) write exactly once: part files over ranges of
ids, a manifest, a lease, and the atomic Parquet sink.

* Part files ``part-<first id>-<last id>.parquet`` each hold a contiguous range of ids, written whole
  under a temporary name and renamed (an S3 PUT is atomic already): a visible part file is complete,
  and its name says which ids it holds, so what is done is read from the listing alone (no file is
  opened) and a rerun writes only the ranges missing.
* ``_manifest.json`` records what the output holds (the request's identity fields, and which job's output
  it is: ``kind``, generation or scoring): it is created
  exclusively, so of two requests racing for a fresh output one claims it, and a rerun that contradicts
  it is refused. The ranges are cut at multiples of the manifest's ``rows_per_file``, so every writer
  of an output writes the same files.
* ``_lease.json`` says a job is writing now: created exclusively, renewed while the job runs, released
  when it ends, and taken over only when stale (or when its job is gone, on the same host).
* Every other file's name starts with ``_`` (``_preview.png``, ``_report.png``), which Parquet readers
  skip, so the folder reads as one dataset; a folder that holds anything else is not ours, and refused.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, replace

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.errors import JobError
from jobs.storage import Storage
from pixelcnn.errors import one_line
from pixelcnn.options import identity_changes

MANIFEST = "_manifest.json"
LEASE = "_lease.json"
PART = re.compile(r"^part-(\d{12})-(\d{12})\.parquet$")
MAX_FILES = 100_000  # part files one request may plan: its plan and Ray Data's items stay small
# What one shard (one part file) may take in memory: an actor, an encode task and a write task each hold
# a whole shard, so a larger one could exhaust a node and never finish.
SHARD_BYTES = 2**30
ROW_OVERHEAD = 1024  # bytes a row takes beyond its images: its other columns, Python's and Arrow's per-object costs
LEASE_RENEW_S = 10.0
LEASE_STALE_S = 60.0  # a lease not renewed for this long belongs to a job that is gone


def part_name(first: int, last: int) -> str:
    return f"part-{first:012d}-{last:012d}.parquet"


def part_ranges(output: Storage) -> list[tuple[int, int, str]]:
    """(first id, last id + 1, name) of every part file, sorted, from the listing alone."""
    ranges = []
    for info in output.list():
        match = PART.match(info.base_name)
        if info.type == pafs.FileType.File and match:
            ranges.append((int(match[1]), int(match[2]) + 1, info.base_name))
    return sorted(ranges)


def check_ours(output: Storage, ranges: list) -> None:
    """Refuse a folder that holds files of something else (it would no longer read as one dataset), and
    part files that overlap (two writers of other layouts), naming them and the repair."""
    foreign = sorted(info.base_name for info in output.list()
                     if not PART.match(info.base_name) and not info.base_name.startswith(("_", ".")))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise JobError(f"{output.uri} holds files that are not this job's ({shown}): use an empty or new --output")
    overlaps = overlapping(ranges)
    if overlaps:
        a, b = overlaps[0]
        raise JobError(f"{output.uri} holds part files that overlap ({a[2]} and {b[2]}"
                       f"{f' and {len(overlaps) - 1} more pairs' if len(overlaps) > 1 else ''}): rerun with --repair to "
                       "delete the files that overlap others (their ids are then written again, once)")


def overlapping(ranges: list) -> list[tuple]:
    pairs, reach = [], None
    for r in ranges:
        if reach is not None and r[0] < reach[1]:
            pairs.append((reach, r))
        if reach is None or r[1] > reach[1]:
            reach = r
    return pairs


def repair(output: Storage, ranges: list) -> list[tuple[int, int, str]]:
    """Delete part files that overlap the ones kept (the longest first, then by first id): every id stays
    in exactly one file or none, and a rerun writes the missing ones. Returns the ranges kept."""
    kept = []
    for r in sorted(ranges, key=lambda r: (-(r[1] - r[0]), r[0])):
        if any(r[0] < k[1] and k[0] < r[1] for k in kept):
            output.delete(r[2])
            print(f"repair: deleted {r[2]} (its ids overlap another file's)", flush=True)
        else:
            kept.append(r)
    return sorted(kept)


def most_rows_per_file(row_bytes: int) -> int:
    """The rows of ``row_bytes`` each that one shard may hold (SHARD_BYTES)."""
    return max(1, SHARD_BYTES // row_bytes)


def check_rows_per_file(rows_per_file: int, row_bytes: int) -> None:
    """Refuse a --rows-per-file whose shards would not fit in SHARD_BYTES: an actor would hold one whole
    and the run might never finish. On the flag itself, not on this request's ids: an output keeps its
    layout, and a rerun may ask for more ids."""
    most = most_rows_per_file(row_bytes)
    if rows_per_file > most:
        raise JobError(f"--rows-per-file {rows_per_file} makes shards of {rows_per_file * row_bytes / 2**30:.1f} GiB "
                       f"(~{row_bytes} bytes a row of these images), more than the {SHARD_BYTES / 2**30:g} GiB one "
                       f"actor may hold: use --rows-per-file {most} or less")


SPLIT = "split the request into outputs of at most {ids} ids each"


def check_files(num_ids: int, rows_per_file: int, row_bytes: int | None = None, split: str = SPLIT) -> None:
    """Refuse a request of more than MAX_FILES part files, naming the --rows-per-file values that would
    take it (within ``check_rows_per_file``'s bound, given ``row_bytes``), or, where none would, ``split``
    (given the most ``ids`` one output can take)."""
    files = -(-num_ids // rows_per_file)
    if files <= MAX_FILES:
        return
    fewest = -(-num_ids // MAX_FILES)
    most = None if row_bytes is None else most_rows_per_file(row_bytes)
    if most is None:
        advice = f"raise --rows-per-file to {fewest} or more"
    elif fewest < most:
        advice = f"raise --rows-per-file to between {fewest} and {most}"
    elif fewest == most:
        advice = f"use --rows-per-file {most}"
    else:
        advice = (f"no --rows-per-file takes it (above {most}, shards exceed {SHARD_BYTES / 2**30:g} GiB): "
                  + split.format(ids=MAX_FILES * most))
    raise JobError(f"{num_ids} ids at {rows_per_file} per file make {files} part files, more than the "
                   f"{MAX_FILES} one output takes: {advice}")


def plan(num_ids: int, done: list[tuple[int, int, str]], rows_per_file: int, *, row_bytes: int | None = None,
         split: str = SPLIT) -> list[tuple[int, int]]:
    """Half-open id ranges still to write: the gaps left by ``done`` in 0..num_ids-1, cut at multiples of
    ``rows_per_file``. O(files), never O(ids); a request of more than MAX_FILES files is refused
    (``check_files``)."""
    check_files(num_ids, rows_per_file, row_bytes, split)
    shards, covered = [], [(a, b) for a, b, _ in done if a < num_ids]
    k = 0
    for start in range(0, num_ids, rows_per_file):
        end = min(start + rows_per_file, num_ids)
        cursor = start
        while k < len(covered) and covered[k][1] <= start:
            k += 1
        j = k
        while j < len(covered) and covered[j][0] < end:
            a, b = covered[j]
            if a > cursor:
                shards.append((cursor, a))
            cursor = max(cursor, b)
            j += 1
        if cursor < end:
            shards.append((cursor, end))
    return shards


def rows_held(ranges: list) -> int:
    return sum(b - a for a, b, _ in ranges)


# --- the manifest --------------------------------------------------------------------------------


# The job that wrote a manifest from before its ``kind`` was recorded, by a field only its manifests hold.
KIND_FIELDS = {"generation": "temperature", "scoring": "data_fingerprint"}


def check_kind(output: Storage, manifest) -> dict | None:
    """The stored manifest, if any; an output of the other bulk job is refused as such (its fields would
    otherwise all differ from this request's), reading only."""
    stored = output.read(MANIFEST)
    if stored is None:
        return None
    try:
        stored = json.loads(stored)
    except ValueError:
        stored = None
    if not isinstance(stored, dict):
        raise JobError(f"{output.uri}/{MANIFEST} is not a JSON object: not an output of this job")
    kind = stored.get("kind") or next((k for k, field in KIND_FIELDS.items() if field in stored), None)
    if kind is not None and kind != manifest.kind:
        raise JobError(f"{output.uri} is a {kind} output, not a {manifest.kind} one: use another --output")
    return stored


def check_manifest(output: Storage, manifest, *, has_parts: bool, upgrade=None) -> dict | None:
    """Refuse an output that holds rows of another request (or of something else). ``upgrade`` fills what
    an older job's manifest lacks (or refuses it). Returns the stored manifest, if any."""
    stored = check_kind(output, manifest)
    if stored is None:
        if has_parts:
            raise JobError(f"{output.uri} holds part files but no {MANIFEST}: not an output of this job")
        return None
    if upgrade is not None:
        stored = upgrade(stored)
    changed = identity_changes(manifest, stored)
    if changed:
        what = ", ".join(f"{k} {then!r} -> {now!r}" for k, then, now in changed)
        if not has_parts:  # claimed by a request that wrote no rows: it failed, or is starting now
            raise JobError(f"{output.uri} is claimed by another request ({what}) that has written no rows yet: "
                           f"if none is running, delete {MANIFEST} there; or use another --output")
        raise JobError(f"{output.uri} holds rows of another request ({what}): use another --output")
    return stored


def claim(output: Storage, manifest, *, has_parts: bool, upgrade=None) -> None:
    """Create the manifest once the request is known to run (so a refused one leaves the output
    untouched), unless one exists, then check the one that stands: of two requests that both found a
    fresh output one creates it and the other, if it differs, stops here."""
    try:
        output.create(MANIFEST, json.dumps(asdict(manifest), indent=1).encode())
    except OSError as error:  # on S3 a conditional PUT through boto3, which finds credentials its own way
        raise JobError(f"cannot write to {output.where}: {one_line(error)}") from None
    stored = check_manifest(output, manifest, has_parts=has_parts, upgrade=upgrade)
    if getattr(manifest, "rows_per_file", None) != stored.get("rows_per_file", getattr(manifest, "rows_per_file", None)):
        raise JobError(f"{output.uri} was claimed just now by another request with --rows-per-file "
                       f"{stored['rows_per_file']}: rerun to write its layout")


def resume(output: Storage, manifest, num_ids: int, *, repair_overlaps: bool = False, upgrade=None,
           row_bytes: int | None = None, split: str = SPLIT):
    """What a request still has to write into ``output``: (its manifest, in the output's own layout; the
    part files there; the shards to write). Refuses an output of another request or of something else,
    and one of too many files (``plan``), reading only."""
    done = part_ranges(output)
    stored = check_manifest(output, manifest, has_parts=bool(done), upgrade=upgrade)
    if stored and stored.get("rows_per_file", manifest.rows_per_file) != manifest.rows_per_file:
        # Every writer of an output writes the same files: its layout is the one it was started with.
        print(f"{output.uri} was started with --rows-per-file {stored['rows_per_file']}: writing its files so", flush=True)
        manifest = replace(manifest, rows_per_file=stored["rows_per_file"])
    if repair_overlaps:
        done = repair(output, done)
    check_ours(output, done)
    return manifest, done, plan(num_ids, done, manifest.rows_per_file, row_bytes=row_bytes, split=split)


# --- the lease -----------------------------------------------------------------------------------


class Lease:
    """This job's claim to be the one writing an output now (``with Lease(output, what):``)."""

    def __init__(self, output: Storage, what: str):
        self.output, self.what = output, what
        self.owner = {"id": uuid.uuid4().hex, "job": what, "host": socket.gethostname(), "pid": os.getpid()}
        self.stop = threading.Event()
        self.thread = None

    def __enter__(self) -> "Lease":
        for _ in range(2):
            if self.output.create(LEASE, self._body()):
                break
            held = self._read()
            if held is None:  # released in between: try again
                continue
            if not self._stale(held):
                age = time.time() - held.get("renewed", 0)
                raise JobError(f"another {held.get('job', 'job')} is writing {self.output.uri} (host {held.get('host')}, "
                               f"pid {held.get('pid')}, lease renewed {age:.0f} s ago): wait for it to finish, or stop "
                               f"it; a lease not renewed for {LEASE_STALE_S:.0f} s is taken over")
            self.output.delete(LEASE)  # its job is gone: take it over (the create below is exclusive again)
        else:
            raise JobError(f"could not take the lease of {self.output.uri}: another job took it at the same time")
        self.thread = threading.Thread(target=self._renew, daemon=True, name="output-lease")
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        held = self._read()
        if held is not None and held.get("id") == self.owner["id"]:
            self.output.delete(LEASE)

    def _body(self) -> bytes:
        return json.dumps({**self.owner, "renewed": time.time()}).encode()

    def _read(self) -> dict | None:
        try:
            data = self.output.read(LEASE)
            return None if data is None else json.loads(data)
        except (OSError, ValueError):
            return None

    def _renew(self) -> None:
        while not self.stop.wait(LEASE_RENEW_S):
            held = self._read()
            if held is not None and held.get("id") != self.owner["id"]:
                print(f"warning: the lease of {self.output.uri} was taken over by {held.get('job')} on "
                      f"{held.get('host')} (pid {held.get('pid')})", flush=True)
                return
            try:
                self.output.write(LEASE, self._body())
            except OSError:
                pass  # a lost endpoint: the job's own writes fail and say so

    @staticmethod
    def _stale(held: dict) -> bool:
        if time.time() - held.get("renewed", 0) > LEASE_STALE_S:
            return True
        if held.get("host") == socket.gethostname():  # the same machine: is its process still there?
            try:
                os.kill(int(held.get("pid", 0)), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError):
                return False
        return False


# --- the sink ------------------------------------------------------------------------------------


# A column the pipeline adds to its rows: when (time.time(), on the node) their shard reached a model
# actor. The sink drops it and hands the earliest back to the driver (``sink.started``), where it parts
# the job's start-up (Ray, the actors) from the pipeline's own time.
STARTED = "_started"


def pass_started(batch: dict, table: pa.Table) -> pa.Table:
    """``table`` (a block's rows) with the ``batch``'s STARTED column, if it has one, for the sink."""
    if STARTED not in batch:  # rows built outside the pipeline (a benchmark)
        return table
    return table.append_column(STARTED, pa.array(batch[STARTED], pa.float64()))


def make_sink(output: Storage, schema: pa.Schema):
    """A Ray Data sink writing each block as part files named by their ids, never visible half-written."""
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class AtomicParquetSink(Datasink):
        started = None  # set in the driver once the write completes

        def write(self, blocks, ctx) -> dict:
            # A write task may run on any node: a local --output must be a folder they all share.
            if not output.s3 and output.read(MANIFEST) is None:
                raise JobError(f"{output.uri} on node {socket.gethostname()} lacks the driver's {MANIFEST}: a local "
                               "--output must be a folder every node shares (or use s3://)")
            rows, started = 0, []
            for block in blocks:
                table = BlockAccessor.for_block(block).to_arrow()
                if STARTED in table.column_names:
                    if table.num_rows:
                        started.append(min(table.column(STARTED).to_pylist()))
                    table = table.drop_columns([STARTED])
                if table.num_rows:
                    write_part(output, table, schema)
                    rows += table.num_rows
            return {"rows": rows, "started": min(started, default=None)}

        def on_write_complete(self, write_result) -> None:
            times = [r["started"] for r in write_result.write_returns if r["started"] is not None]
            self.started = min(times, default=None)

    return AtomicParquetSink()


def timings(rows: int, started: float, pipeline_started: float | None, ended: float) -> dict:
    """A bulk job's seconds (``time.time()`` at ``started`` and ``ended``), parted where its first shard
    reached a model actor (``pipeline_started``, the sink's ``started``) into start-up (Ray, the actor
    pool, the actors loading the model) and the pipeline, and the rows per second of the whole and of
    the pipeline. The actor's clock is its node's: the cut is kept within the span."""
    cut = ended if pipeline_started is None else min(max(pipeline_started, started), ended)
    seconds, pipeline = ended - started, ended - cut
    return {"seconds": round(seconds, 3), "per_s": round(rows / seconds, 2) if rows and seconds > 0 else 0.0,
            "startup_seconds": round(cut - started, 3), "pipeline_seconds": round(pipeline, 3),
            "pipeline_per_s": round(rows / pipeline, 2) if rows and pipeline > 0 else 0.0}


def timing_text(times: dict, unit: str) -> str:
    """The summary's seconds, as "5.4 s: 4.9 s start-up, 0.5 s pipeline (24.0 images/s)" (``unit``: images,
    samples); just "0.2 s" when there was no pipeline."""
    if not times["pipeline_seconds"]:
        return f"{times['seconds']:.1f} s"
    return (f"{times['seconds']:.1f} s: {times['startup_seconds']:.1f} s start-up, {times['pipeline_seconds']:.1f} s "
            f"pipeline ({times['pipeline_per_s']:.1f} {unit}/s)")


def write_part(output: Storage, table: pa.Table, schema: pa.Schema) -> None:
    """One part file for a block of one shard's ids (its name says which range they span; scoring may
    leave out the ids of images that did not decode)."""
    ids = table.column("id").to_numpy()
    first, last = int(ids.min()), int(ids.max())
    if len(np.unique(ids)) != len(ids):
        raise RuntimeError(f"a block of ids {first}..{last} holds an id twice")
    buffer = pa.BufferOutputStream()
    pq.write_table(table.sort_by("id").cast(schema), buffer)
    output.write(part_name(first, last), buffer.getvalue().to_pybytes())
