"""Full-text search over a folder of documents (the `consultar_kb` tool), with SQLite FTS5.

The index lives in memory and is rebuilt whole when the folder changes: a knowledge base of
this kind is a few hundred documents at most, so a rebuild takes milliseconds and is far
simpler than incremental bookkeeping. A change is detected from the files' names, sizes and
mtimes, checked at most every `recheck_s` seconds so a burst of searches stats the folder once.

SQLite calls block, so async callers use `asearch`, which runs in a worker thread; one lock
serialises the connection, which sqlite3 does not allow to be used from two threads at once.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rom_agent.logs import get_logger

SUFFIXES = frozenset({".md", ".markdown", ".txt"})
_MAX_FILE_BYTES = 2 * 1024 * 1024  # larger files are skipped (logged): they are not notes
_SNIPPET_TOKENS = 24
_MAX_TITLE_CHARS = 120

_WORD = re.compile(r"\w+", re.UNICODE)
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
# Words so common they would make every document match an OR query.
_STOPWORDS = frozenset(
    "a o as os e é de da do das dos em no na nos nas um uma uns umas para por pelo pela com "
    "sem que se ao aos à às ou mais como qual quais sobre entre the of and or to in on for".split()
)

_log = get_logger(__name__)

Signature = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True, slots=True)
class Hit:
    source: str  # path relative to the KB folder, with forward slashes
    title: str
    snippet: str


def _term(word: str) -> str:
    # A crude stem as a prefix query catches most Portuguese inflections (processual/
    # processuais, recurso/recursal, apelação/apelações) without a stemmer dependency.
    if len(word) >= 6:
        return f'"{word[:-2]}"*'
    if len(word) >= 4:
        return f'"{word}"*'
    return f'"{word}"'


def fts_query(text: str) -> str | None:
    """An FTS5 MATCH expression for free text: any of its words, ranked by BM25.

    Every word is quoted, so FTS5 operators and punctuation in the model's query are inert.
    """
    words = [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]
    if not words:
        return None
    return " OR ".join(_term(w) for w in dict.fromkeys(words))


def _title(path: Path, text: str) -> str:
    """The first Markdown heading, else a short first line, else the file name."""
    heading = _HEADING.search(text)
    if heading:
        return heading.group(1)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if 0 < len(first) <= _MAX_TITLE_CHARS:
        return first
    return path.stem.replace("-", " ").replace("_", " ")


class KnowledgeBase:
    def __init__(
        self,
        directory: str | Path,
        *,
        recheck_s: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = Path(directory)
        self._recheck_s = recheck_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute(
            "CREATE VIRTUAL TABLE docs USING fts5("
            "source UNINDEXED, title, body, tokenize='unicode61 remove_diacritics 2')"
        )
        self._signature: Signature | None = None
        self._checked_at = float("-inf")
        self.refresh()

    @property
    def document_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM docs").fetchone()[0])

    def refresh(self) -> bool:
        """Re-index if the folder changed since the last look; True when it did."""
        with self._lock:
            return self._refresh_locked(force=True)

    def search(self, query: str, limit: int = 5) -> list[Hit]:
        """The best `limit` matches, best first (blocking; see `asearch`)."""
        match = fts_query(query)
        with self._lock:
            self._refresh_locked(force=False)
            if match is None:
                return []
            rows = self._db.execute(
                "SELECT source, title, snippet(docs, 2, '', '', '…', ?) FROM docs "
                "WHERE docs MATCH ? ORDER BY bm25(docs, 0.0, 2.0, 1.0) LIMIT ?",
                (_SNIPPET_TOKENS, match, limit),
            ).fetchall()
        return [Hit(source, title, " ".join(snippet.split())) for source, title, snippet in rows]

    async def asearch(self, query: str, limit: int = 5) -> list[Hit]:
        return await asyncio.to_thread(self.search, query, limit)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ indexing

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(
            path
            for path in self.directory.rglob("*")
            if path.suffix.lower() in SUFFIXES
            and path.is_file()
            and not any(part.startswith(".") for part in path.relative_to(self.directory).parts)
        )

    def _scan(self) -> tuple[list[Path], Signature]:
        files = self._files()
        signature = []
        for path in files:
            stat = path.stat()
            signature.append((path.as_posix(), stat.st_size, stat.st_mtime_ns))
        return files, tuple(signature)

    def _refresh_locked(self, *, force: bool) -> bool:
        now = self._monotonic()
        if not force and now - self._checked_at < self._recheck_s:
            return False
        self._checked_at = now
        try:
            files, signature = self._scan()
        except OSError as exc:  # a file vanished mid-scan: keep the old index, retry later
            _log.warning("kb_scan_failed", directory=str(self.directory), error=str(exc))
            return False
        if signature == self._signature:
            return False
        self._rebuild(files)
        self._signature = signature
        return True

    def _rebuild(self, files: list[Path]) -> None:
        rows = []
        for path in files:
            try:
                if path.stat().st_size > _MAX_FILE_BYTES:
                    _log.warning("kb_file_skipped", file=str(path), reason="too large")
                    continue
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                _log.warning("kb_file_skipped", file=str(path), reason=str(exc))
                continue
            source = path.relative_to(self.directory).as_posix()
            rows.append((source, _title(path, text), text))
        with self._db:  # one transaction: a failed rebuild leaves the previous index intact
            self._db.execute("DELETE FROM docs")
            self._db.executemany("INSERT INTO docs (source, title, body) VALUES (?, ?, ?)", rows)
        if not self.directory.is_dir():
            _log.warning("kb_dir_missing", directory=str(self.directory))
        _log.info("kb_indexed", directory=str(self.directory), documents=len(rows))
