"""Posts on disk: one SQLite file under the data directory.

Calls are synchronous on the event loop on purpose: each is an indexed query or one
small transaction (well under a millisecond in WAL mode), cheaper than a hop to a thread.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

from meshllm.common.blackboard.types import FeedQuery, NodeId, Post, PostId
from meshllm.common.errors import ConfigError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS posts (
  post_id TEXT PRIMARY KEY,
  author TEXT NOT NULL,
  origin_node TEXT NOT NULL,
  created_unix_ms INTEGER NOT NULL,
  text TEXT NOT NULL,
  tags TEXT NOT NULL,          -- JSON list, for reading back
  channel TEXT NOT NULL,
  reply_to TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS posts_created ON posts (created_unix_ms, post_id);
CREATE INDEX IF NOT EXISTS posts_author ON posts (author, created_unix_ms);
CREATE TABLE IF NOT EXISTS post_tags (
  tag TEXT NOT NULL,
  post_id TEXT NOT NULL REFERENCES posts (post_id) ON DELETE CASCADE,
  PRIMARY KEY (tag, post_id)
);
CREATE INDEX IF NOT EXISTS post_tags_post ON post_tags (post_id);
-- Schema 2: one embedding per post, of the model named (float32, little-endian).
-- Databases of schema 1 gain the table when opened; their posts are embedded later.
CREATE TABLE IF NOT EXISTS post_vectors (
  post_id TEXT PRIMARY KEY REFERENCES posts (post_id) ON DELETE CASCADE,
  model TEXT NOT NULL,
  vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS post_vectors_model ON post_vectors (model);
"""
SCHEMA_VERSION = 2
_COLUMNS = "post_id, author, origin_node, created_unix_ms, text, tags, channel, reply_to"
# SQLite's default limit on bound parameters is 999 in older builds; stay well under.
_CHUNK = 500


def _row_to_post(row: Sequence[object]) -> Post:
    post_id, author, origin, created, text, tags, channel, reply_to = row
    return Post(PostId(str(post_id)), str(author), NodeId(str(origin)), int(str(created)),
                str(text), tuple(json.loads(str(tags))), str(channel),
                PostId(str(reply_to)) if reply_to else None)


class PostStore:
    def __init__(self, data_dir: Path, node_id: NodeId) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "blackboard.sqlite3"
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.executescript("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; "
                               "PRAGMA foreign_keys=ON;" + _SCHEMA)
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))
        self._claim(node_id)

    def _claim(self, node_id: NodeId) -> None:
        """A data directory belongs to one node: two nodes sharing one file would each
        believe they hold what the other stored, and never fetch it."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'node_id'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('node_id', ?)", (node_id,))
        elif row[0] != node_id:
            raise ConfigError("--data-dir / MESHLLM_DATA_DIR",
                              f"{self.path} belongs to node {row[0]!r}, not {node_id!r}; "
                              "give each node its own data directory")

    def insert(self, posts: Iterable[Post]) -> tuple[list[Post], int]:
        """Store the posts not held yet. Returns those that were new, and the duplicates."""
        new: list[Post] = []
        duplicates = 0
        with self._transaction():
            for p in posts:
                cursor = self._db.execute(
                    f"INSERT OR IGNORE INTO posts ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (p.post_id, p.author, p.origin_node, p.created_unix_ms, p.text,
                     json.dumps(list(p.tags)), p.channel, p.reply_to or ""))
                if cursor.rowcount == 0:
                    duplicates += 1
                    continue
                self._db.executemany("INSERT INTO post_tags VALUES (?, ?)",
                                     [(t, p.post_id) for t in p.tags])
                new.append(p)
        return new, duplicates

    def feed(self, q: FeedQuery) -> list[Post]:
        where: list[str] = ["created_unix_ms >= ?"]
        args: list[object] = [q.since_unix_ms]
        if q.author:
            where.append("author = ?")
            args.append(q.author)
        if q.channel:
            where.append("channel = ?")
            args.append(q.channel)
        if q.tag:
            where.append("post_id IN (SELECT post_id FROM post_tags WHERE tag = ?)")
            args.append(q.tag)
        sql = (f"SELECT {_COLUMNS} FROM posts WHERE {' AND '.join(where)} "
               "ORDER BY created_unix_ms DESC, post_id DESC LIMIT ?")
        return [_row_to_post(r) for r in self._db.execute(sql, (*args, q.limit))]

    def search_candidates(self, words: Sequence[str], cap: int) -> list[Post]:
        """Newest posts containing any of the words (a superset of the hits)."""
        if not words:
            return []
        like = " OR ".join(["text LIKE ? ESCAPE '\\' OR tags LIKE ? ESCAPE '\\'"] * len(words))
        args: list[object] = []
        for w in words:
            pattern = "%" + w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            args += [pattern, pattern]
        sql = (f"SELECT {_COLUMNS} FROM posts WHERE {like} "
               "ORDER BY created_unix_ms DESC, post_id DESC LIMIT ?")
        return [_row_to_post(r) for r in self._db.execute(sql, (*args, cap))]

    def author_times_since(self, author: str, since_unix_ms: int) -> list[int]:
        rows = self._db.execute(
            "SELECT created_unix_ms FROM posts WHERE author = ? AND created_unix_ms > ?",
            (author, since_unix_ms))
        return [int(r[0]) for r in rows]

    def ids_since(self, since_unix_ms: int) -> list[PostId]:
        rows = self._db.execute(
            "SELECT post_id FROM posts WHERE created_unix_ms >= ?", (since_unix_ms,))
        return [PostId(r[0]) for r in rows]

    def ids_between(self, ranges: Sequence[tuple[int, int]]) -> list[PostId]:
        """Ids created in any of the [start, end) ranges."""
        found: list[PostId] = []
        for start, end in ranges:
            rows = self._db.execute("SELECT post_id FROM posts WHERE created_unix_ms >= ? "
                                    "AND created_unix_ms < ?", (start, end))
            found += [PostId(r[0]) for r in rows]
        return found

    def get(self, ids: Sequence[PostId]) -> list[Post]:
        posts: list[Post] = []
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i:i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM posts WHERE post_id IN ({marks})", chunk)
            posts += [_row_to_post(r) for r in rows]
        return posts

    def unembedded(self, model: str, limit: int) -> list[Post]:
        """Newest posts without a vector of this model (new posts are embedded first)."""
        rows = self._db.execute(
            f"SELECT {', '.join('p.' + c for c in _COLUMNS.split(', '))} FROM posts p "
            "LEFT JOIN post_vectors v ON v.post_id = p.post_id AND v.model = ? "
            "WHERE v.post_id IS NULL ORDER BY p.created_unix_ms DESC, p.post_id DESC LIMIT ?",
            (model, limit))
        return [_row_to_post(r) for r in rows]

    def put_vectors(self, model: str, vectors: Sequence[tuple[PostId, bytes]]) -> int:
        """Store float32 vectors; a post expired meanwhile is skipped. Returns how many."""
        stored = 0
        with self._transaction():
            for post_id, vector in vectors:
                stored += self._db.execute(
                    "INSERT OR REPLACE INTO post_vectors SELECT ?, ?, ? "
                    "WHERE EXISTS (SELECT 1 FROM posts WHERE post_id = ?)",
                    (post_id, model, vector, post_id)).rowcount
        return stored

    def vectors(self, model: str) -> list[tuple[PostId, bytes]]:
        rows = self._db.execute("SELECT post_id, vector FROM post_vectors WHERE model = ?",
                                (model,))
        return [(PostId(r[0]), bytes(r[1])) for r in rows]

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM posts").fetchone()[0])

    def oldest_unix_ms(self) -> int | None:
        row = self._db.execute("SELECT MIN(created_unix_ms) FROM posts").fetchone()
        return None if row[0] is None else int(row[0])

    def prune(self, cutoff_unix_ms: int, max_posts: int) -> int:
        """Drop posts older than the cutoff, then the oldest beyond max_posts."""
        with self._transaction():
            expired = self._db.execute(
                "DELETE FROM posts WHERE created_unix_ms < ?", (cutoff_unix_ms,)).rowcount
            excess = max(0, self.count() - max_posts)
            if excess:
                self._db.execute(
                    "DELETE FROM posts WHERE post_id IN (SELECT post_id FROM posts "
                    "ORDER BY created_unix_ms, post_id LIMIT ?)", (excess,))
        return int(expired) + excess

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
