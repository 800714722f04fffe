"""The measured decisions' cache: one JSON file per user, keyed by everything that can change a
decision (the machine, the software, the dtype policy, the layer's shapes; `capsnet.autotune` builds
the keys). It holds data only, never code."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

ENV_CACHE_DIR = "CAPSNET_CACHE_DIR"
CACHE_FILE = "decisions.json"
CACHE_VERSION = 1

Say = Callable[[str], None]


def cache_dir() -> Path:
    """`$CAPSNET_CACHE_DIR`, else `$XDG_CACHE_HOME/capsnet-keras`, else `~/.cache/capsnet-keras`."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "capsnet-keras"


class DecisionCache:
    """The decisions measured on this machine: one JSON file, `{"version": 1, "entries": {key: record}}`.

    The file is read once, on first use; a file that is not such JSON is ignored with one warning line
    (it is data, never executed) and replaced on the next write. Writes go to a temporary file that
    replaces the old one, so an interrupted run leaves the old cache or the new, never half of one; a
    cache that cannot be written (read-only home) keeps its decisions for this process and says so.

    Args:
        path: the JSON file (default `cache_dir() / CACHE_FILE`).
        say: where the one-line warnings go.
    """

    def __init__(self, path: Path | None = None, say: Say = print) -> None:
        self.path = Path(path) if path is not None else cache_dir() / CACHE_FILE
        self.say = say
        self._entries: dict[str, dict] | None = None

    @staticmethod
    def key_text(key: dict) -> str:
        return json.dumps(key, sort_keys=True, separators=(",", ":"))

    def _load(self) -> dict[str, dict]:
        if self._entries is not None:
            return self._entries
        self._entries = {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return self._entries
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            self.say(f"Warning: ignoring the unreadable autotune cache {self.path} ({type(e).__name__}); "
                     "it will be measured again and rewritten.")
            return self._entries
        entries = data.get("entries") if isinstance(data, dict) else None
        if (not isinstance(data, dict) or data.get("version") != CACHE_VERSION
                or not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values())):
            self.say(f"Warning: ignoring the autotune cache {self.path} (not a version-{CACHE_VERSION} "
                     "decisions file); it will be measured again and rewritten.")
            return self._entries
        self._entries = entries
        return self._entries

    def records(self) -> list[tuple[dict, dict]]:
        """Every `(key, record)` stored."""
        return [(json.loads(text), record) for text, record in self._load().items()]

    def get(self, key: dict) -> dict | None:
        """The record stored for `key`, or None."""
        return self._load().get(self.key_text(key))

    def put(self, key: dict, record: dict) -> None:
        """Stores `record` (JSON-serialisable) for `key` and rewrites the file."""
        entries = self._load()
        entries[self.key_text(key)] = record
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, suffix=".tmp", delete=False,
                                             encoding="utf-8") as f:
                json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(f.name, self.path)
        except OSError as e:
            with contextlib.suppress(NameError, OSError):
                os.unlink(f.name)
            self.say(f"Warning: could not write the autotune cache {self.path} ({e.strerror or e}); "
                     f"set {ENV_CACHE_DIR} to a writable folder to keep decisions between runs.")
