"""The policy set in force, swapped atomically on reload."""

from __future__ import annotations

import logging
from pathlib import Path

from mcp_zero.errors import PolicyError
from mcp_zero.kernel.action import Action
from mcp_zero.policy.decision import PolicyDecision
from mcp_zero.policy.engine import DEFAULT_CACHE_SIZE, PolicyEngine
from mcp_zero.policy.loader import read_policy_dir

log = logging.getLogger(__name__)


class PolicyStore:
    """Holds the engine for a policy directory and replaces it on ``reload``.

    Readers call ``decide``/``require`` (or take ``engine``); a reload parses
    and validates the new files completely before one reference swap, so a
    call sees either the old set or the new one, never a mix, and a bad file
    leaves the old set in force.
    """

    def __init__(self, policy_dir: Path, *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        """Load the policies of ``policy_dir``. Raises PolicyError as PolicyEngine.load."""
        self._dir = policy_dir
        self._cache_size = cache_size
        self._engine = PolicyEngine.load(policy_dir, cache_size=cache_size)
        # The engine's ``uses_labels``, a plain attribute the kernel reads on every call.
        self.uses_labels = self._engine.uses_labels
        self._generation = 1
        # whether the files read, at the last look (changed), as the set in force
        self.files_in_force = True
        # What refresh() last failed on: the files that did not load, or the read error.
        self._refused: dict[str, str] | str | None = None
        # A change refresh() saw once and waits to read the same again before it loads it.
        self._settling: dict[str, str] | None = None

    @property
    def policy_dir(self) -> Path:
        return self._dir

    @property
    def engine(self) -> PolicyEngine:
        """The engine in force now."""
        return self._engine

    @property
    def generation(self) -> int:
        """1 at load, incremented by every successful reload."""
        return self._generation

    def reload(self) -> PolicyEngine:
        """Re-read the directory and put the new policy set in force.

        Returns the new engine. Raises PolicyError (naming the file and line)
        when the new files do not parse or validate; the old set stays in force.
        """
        engine = PolicyEngine.load(self._dir, cache_size=self._cache_size)
        self.put_in_force(engine)
        return engine

    def refresh(self) -> PolicyEngine | None:
        """:meth:`changed`, put in force."""
        engine = self.changed()
        if engine is not None:
            self.put_in_force(engine)
        return engine

    def changed(self) -> PolicyEngine | None:
        """The directory's policy set, loaded but not in force yet, if its files differ from
        the set in force *and* read the same as on the previous call; None otherwise. The
        caller puts it in force (:meth:`put_in_force`) once its change is recorded; until
        then the files still differ, and a later call loads them again.

        A change is taken up on the second call that reads it, not the first: a file being
        written in place (truncated, then written) within the time between two calls is not
        put in force half-written — an empty file in the middle of an edit would drop its
        ``forbid`` policies for a while. A write that pauses longer is not covered: writing
        the new file under another name and renaming it over the old is atomic.
        Raises PolicyError (as :meth:`reload`) once for a changed set that does not
        load, or a directory that cannot be read; the old set stays in force, and the same
        failure is not reported again until something changes. Files changed back to the set
        in force after such a failure (the broken file removed) are logged as valid again.
        """
        try:
            sources = read_policy_dir(self._dir)
        except PolicyError as exc:
            self._settling = None
            if self._refused == exc.message:
                return None
            self._refused = exc.message
            raise
        if sources == self._engine.sources:
            self._settling = None
            if self._refused is not None:
                # its failure was reported: say that it is over (found by review)
                log.info(
                    "policy files are valid again: they are the set in force, unchanged (%s)",
                    self._dir.name,
                )
                self._refused = None  # a new failure is news again
            self.files_in_force = True
            return None
        self.files_in_force = False
        if sources == self._refused:
            return None
        if sources != self._settling:
            self._settling = sources  # seen once: load it if the next call reads it again
            return None
        self._settling = None
        try:
            engine = PolicyEngine.from_sources(sources, cache_size=self._cache_size)
        except Exception:
            self._refused = sources
            raise
        self._refused = None
        return engine

    def put_in_force(self, engine: PolicyEngine) -> None:
        """Make ``engine`` (from :meth:`changed`) the set in force."""
        # A call decided between the two lines meets labels whenever either set reads them
        self.uses_labels = self.uses_labels or engine.uses_labels
        self._engine = engine
        self.uses_labels = engine.uses_labels
        self._generation += 1

    def decide(self, action: Action) -> PolicyDecision:
        """``engine.decide(action)`` on the set in force."""
        return self._engine.decide(action)
