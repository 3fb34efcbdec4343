"""The inboxes a daemon serves at run time, and how a reloaded config changes them.

An inbox that keeps its name and folder keeps its watcher's claims, so files in flight finish
normally under the new settings. An inbox that is removed (or moved to another folder) stops
taking files at once but keeps its heartbeat until its last job is finished, so no other daemon
mistakes those jobs for orphans.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from hotfolder.claims import ClaimStore
from hotfolder.config import InboxConfig
from hotfolder.watch import InboxWatcher

log = logging.getLogger(__name__)

WATCH_SETTINGS = ("path", "polling", "recursive", "settle_ms", "incomplete_grace_ms")


class Inbox:
    """One configured inbox at run time: its settings, watcher and claims."""

    def __init__(
        self,
        config: InboxConfig,
        scan_interval: float,
        observe: bool,
        on_detected: Callable[[str, bool], None],
        on_restart: Callable[[str], None],
    ) -> None:
        self.config = config
        self.scan_interval = scan_interval
        self.observe = observe
        self.on_detected = on_detected
        self.on_restart = on_restart
        self.claims = ClaimStore(config.name, config.path)
        self.watcher = self._new_watcher()

    def _new_watcher(self) -> InboxWatcher:
        name = self.config.name
        return InboxWatcher(
            self.config,
            self.scan_interval,
            observe=self.observe,
            on_detected=lambda by_scan: self.on_detected(name, by_scan),
            on_restart=lambda: self.on_restart(name),
        )

    def start(self) -> None:
        # Work folders first: created under a running recursive watch, each new folder would
        # race its own creation event for a watch (watchdog warns "Callback ... already exists").
        self.claims.open()
        self.watcher.start()

    def reconfigure(self, config: InboxConfig) -> None:
        """New settings for the same folder: outputs apply to the next file published; a
        change in how the folder is watched restarts the watcher (which rescans)."""
        old, self.config = self.config, config
        if any(getattr(old, key) != getattr(config, key) for key in WATCH_SETTINGS):
            self.watcher.stop()
            self.watcher = self._new_watcher()
            self.watcher.start()

    def stop_watching(self) -> None:
        self.watcher.stop()

    def stop(self) -> None:
        self.watcher.stop()
        self.claims.close()


class InboxSet:
    """The active inboxes, plus retired ones that still finish their jobs."""

    def __init__(self, make: Callable[[InboxConfig], Inbox]) -> None:
        self.make = make
        self.active: list[Inbox] = []
        self.retiring: list[Inbox] = []

    def start(self, configs: tuple[InboxConfig, ...]) -> list[Inbox]:
        self.active = [self.make(c) for c in configs]
        for inbox in self.active:
            inbox.start()
        return self.active

    def apply(self, configs: tuple[InboxConfig, ...]) -> list[Inbox]:
        """Switch to a new list of inbox settings; returns the inboxes that were added."""
        current = {inbox.config.name: inbox for inbox in self.active}
        wanted = {c.name: c for c in configs}
        for name, inbox in current.items():
            if name not in wanted or wanted[name].path != inbox.config.path:
                log.info("inbox %s: no longer served; finishing its jobs", name)
                inbox.stop_watching()
                self.retiring.append(inbox)
        added, active = [], []
        for config in configs:
            kept = current.get(config.name)
            if kept is not None and kept.config.path == config.path:
                if kept.config != config:
                    kept.reconfigure(config)
                active.append(kept)
                continue
            inbox = self.make(config)
            inbox.start()
            added.append(inbox)
            active.append(inbox)
            log.info("inbox %s: now served (%s)", config.name, config.path)
        self.active = active
        return added

    def heartbeat(self, reachable: Callable[[Inbox], bool]) -> None:
        """Refresh the heartbeat of each inbox that is ``reachable`` (a heartbeat written into
        a bare mountpoint would create folders there)."""
        for inbox in self.active + self.retiring:
            if not reachable(inbox):
                continue
            try:
                inbox.claims.heartbeat()
            except OSError as exc:
                log.warning("inbox %s: cannot refresh its heartbeat: %s", inbox.config.name, exc)

    def close_retired(self, busy: Callable[[Inbox], bool]) -> None:
        for inbox in list(self.retiring):
            if not busy(inbox):
                inbox.claims.close()
                self.retiring.remove(inbox)

    def stop(self) -> None:
        for inbox in self.active + self.retiring:
            inbox.stop()
