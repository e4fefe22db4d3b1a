"""SQLite behind one dedicated thread, with group commit.

SQLite calls block, so none may run on the event loop. All work goes to a single thread that
owns the connection (SQLite serialises writers anyway, so more threads would only contend).
Writes that arrive while a commit is in progress are committed together in the next
transaction, each inside its own SAVEPOINT so one failing job never undoes another: under load
many turns share one commit, and a 200 still means the turn is on disk in the WAL.

WAL with synchronous=NORMAL survives a crash or `kill -9` of the process (the WAL is written
before the commit returns); only an OS crash or power loss can lose the last transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

Job = Callable[[sqlite3.Connection], Any]

_STOP = object()
_MAX_BATCH = 256


class DatabaseClosedError(RuntimeError):
    """Work submitted while the database is closing or closed: it was not run."""

    def __init__(self, path: str) -> None:
        super().__init__(f"database {path!r} is closing: the work was not run")


@dataclass(slots=True)
class _Work:
    job: Job
    write: bool
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled; the work itself still happened (or not)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Database:
    """An async facade over one SQLite connection owned by a worker thread."""

    def __init__(self, path: str, *, schema: str = "") -> None:
        self._path = path
        self._schema = schema
        self._queue: queue.SimpleQueue[_Work | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._closing = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="rom-agent-sqlite", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    async def close(self) -> None:
        """Finish every job queued so far, then close the connection. Work submitted from now
        on fails at once with `DatabaseClosedError` (queued behind the stop marker, it would
        never run and its caller would wait forever)."""
        if self._thread is None or self._closing:
            return
        self._closing = True
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # ------------------------------------------------------------------ API

    async def read(self, job: Callable[[sqlite3.Connection], T]) -> T:
        return await self._submit(job, write=False)

    async def write(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run `job` in a transaction; returns once it is committed."""
        return await self._submit(job, write=True)

    def _submit(self, job: Callable[[sqlite3.Connection], T], *, write: bool) -> asyncio.Future[T]:
        if self._closing:
            raise DatabaseClosedError(self._path)
        if self._thread is None:
            raise RuntimeError("database is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Work(job, write, future, loop))
        return future

    # ------------------------------------------------------------------ worker thread

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA foreign_keys=ON")
        connection.execute("PRAGMA busy_timeout=5000")
        if self._schema:
            connection.executescript(self._schema)
        return connection

    def _run(self) -> None:
        try:
            connection = self._connect()
        except BaseException as exc:  # reported to start()
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                batch = [first]
                stop = False
                while len(batch) < _MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stop = True
                        break
                    batch.append(item)
                self._execute(connection, batch)  # type: ignore[arg-type]
                if stop:
                    return
        finally:
            connection.close()
            self._fail_leftovers()

    def _fail_leftovers(self) -> None:
        """Fail work that slipped in behind the stop marker (submitted from another thread
        between the `_closing` check and the marker): nothing will ever run it."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Work):
                with contextlib.suppress(RuntimeError):
                    error = DatabaseClosedError(self._path)
                    item.loop.call_soon_threadsafe(_resolve, item.future, None, error)

    def _execute(self, connection: sqlite3.Connection, batch: list[_Work]) -> None:
        outcomes: list[tuple[_Work, Any, BaseException | None]] = []
        writes = [work for work in batch if work.write]
        for work in batch:
            if not work.write:
                outcomes.append(self._run_one(connection, work))
        if writes:
            try:
                connection.execute("BEGIN IMMEDIATE")
                staged = []
                for work in writes:
                    connection.execute("SAVEPOINT job")
                    result, error = self._call(connection, work)
                    if error is None:
                        connection.execute("RELEASE job")
                    else:
                        connection.execute("ROLLBACK TO job")
                        connection.execute("RELEASE job")
                    staged.append((work, result, error))
                connection.execute("COMMIT")
                outcomes.extend(staged)
            except sqlite3.Error as exc:  # the commit itself failed: nothing was stored
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                outcomes.extend((work, None, exc) for work in writes)
        for work, result, error in outcomes:
            # RuntimeError: that event loop is gone, so nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                work.loop.call_soon_threadsafe(_resolve, work.future, result, error)

    @staticmethod
    def _call(connection: sqlite3.Connection, work: _Work) -> tuple[Any, BaseException | None]:
        try:
            return work.job(connection), None
        except Exception as exc:
            return None, exc

    def _run_one(
        self, connection: sqlite3.Connection, work: _Work
    ) -> tuple[_Work, Any, BaseException | None]:
        result, error = self._call(connection, work)
        return work, result, error
