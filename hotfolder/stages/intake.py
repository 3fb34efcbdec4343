"""The intake stage: watch the inboxes, claim ready files when the pipeline has room, adopt the
jobs of daemons that died, apply a reloaded config, and keep the backlog gauges current.

It owns the set of inboxes (a SIGHUP changes it here, in this thread, from the flag the signal
handler set) and the list of files that are ready but not claimed yet.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections import deque
from dataclasses import replace

from hotfolder import config, memory, names, roots
from hotfolder.claims import Claim
from hotfolder.inboxes import Inbox
from hotfolder.jobs import Reason
from hotfolder.outcomes import Outcomes, file_original
from hotfolder.pipeline import PAUSE_REASONS, Pipeline
from hotfolder.watch import Ready

log = logging.getLogger(__name__)

INTAKE_TICK = 0.05
HOUSEKEEPING_SECONDS = 5.0  # heartbeats, backlog gauges, disk space, GPU memory
# Config sections a SIGHUP cannot change in a running process (inboxes, outputs, batching and
# limits apply at once).
RESTART_ONLY = ("model", "daemon", "metrics", "journal")


class Intake:
    def __init__(self, pipeline: Pipeline, outcomes: Outcomes) -> None:
        self.pipeline = pipeline
        self.outcomes = outcomes
        self.ready: deque[tuple[Inbox, Ready]] = deque()
        self.scanned_once = False
        self.next_housekeeping = 0.0

    def step(self) -> bool:
        """Reload if asked, take what the watchers found, claim while there is room; False
        once the stage is finished (stopping, or ``--once`` with nothing left)."""
        pipeline = self.pipeline
        if pipeline.stopping.is_set():
            return False
        if pipeline.reload_requested.is_set():
            pipeline.reload_requested.clear()
            self.reload()
        now = time.monotonic()
        for inbox in pipeline.inboxes.active:
            for ready in inbox.watcher.step(now):
                self.ready.append((inbox, ready))
        self.scanned_once = True
        self.check_roots(now)
        if pipeline.pause.active:
            self.probe(now)
        self.show_pause()
        if not pipeline.pause.active:
            self.feed_claims()
        if now >= self.next_housekeeping:
            self.next_housekeeping = now + HOUSEKEEPING_SECONDS
            self.housekeeping()
        if pipeline.once and (self.blocked() or self.idle()):
            pipeline.stop_requested.set()
            return False
        time.sleep(INTAKE_TICK)
        return True

    def feed_claims(self) -> None:
        pipeline = self.pipeline
        while pipeline.recovered and not pipeline.claims.full():
            pipeline.claims.put(pipeline.recovered.popleft())
        while self.ready and not pipeline.claims.full():
            inbox, ready = self.ready.popleft()
            if pipeline.roots_of(inbox.config).away():
                self.ready.appendleft((inbox, ready))
                return  # the next step pauses intake for it
            try:
                claim = inbox.claims.claim(ready.relative, ready.detected_at)
            except OSError as exc:  # the work folder cannot be written: the disk, not the file
                reason = PAUSE_REASONS.get(exc.errno or 0, roots.AWAY)
                pipeline.hold_failing(inbox.config, reason, 0, exc)
                self.ready.appendleft((inbox, ready))
                return
            inbox.watcher.done(ready.relative)
            if claim is None:
                continue  # gone, or another daemon took it
            self.outcomes.begin(claim)
            pipeline.claims.put((inbox, claim))

    def blocked(self) -> bool:
        """``--once`` cannot go on: intake is paused (a disk full, a share away) and nothing is
        in flight. It stops rather than wait, and says so in its exit code (1): a cron job
        tries again later, when the files are still in the inbox."""
        pipeline = self.pipeline
        if not pipeline.pause.active or pipeline.busy():
            return False
        reasons = ", ".join(sorted(pipeline.pause.reasons()))
        log.error("stopping: intake is paused (%s); the files stay in the inbox", reasons)
        pipeline.blocked = True
        return True

    def idle(self) -> bool:
        pipeline = self.pipeline
        pending = any(inbox.watcher.waiting() for inbox in pipeline.inboxes.active)
        waiting = self.ready or pipeline.recovered
        return self.scanned_once and not pipeline.busy() and not pending and not waiting

    # ----- jobs left by daemons that died ------------------------------------------------

    def recover(self) -> None:
        """Adopt every dead daemon's jobs: finish those whose outcome was decided, queue the
        rest (suspects of the crash apart, to be retried alone)."""
        for inbox in self.pipeline.inboxes.active:
            for claim in inbox.claims.recover():
                try:
                    self._resume(inbox, claim)
                except Exception as exc:  # one bad job never keeps the daemon from serving
                    self._abandon(inbox, claim, exc)

    def _resume(self, inbox: Inbox, claim: Claim) -> None:
        log.info("%s/%s: resuming a job left by a stopped daemon", inbox.config.name,
                 names.escape(claim.relative))  # fmt: skip
        self.outcomes.begin(claim)
        if claim.outcome:
            # Stopped after deciding the outcome: finish filing the original if the daemon
            # died before it left the work folder.
            if os.path.lexists(claim.source):
                file_original(inbox.config, claim)
            self.outcomes.close_archived(inbox, claim)
        elif claim.solo:
            self.pipeline.suspects.append((inbox, claim))
        else:
            self.pipeline.recovered.append((inbox, claim))

    def _abandon(self, inbox: Inbox, claim: Claim, error: Exception) -> None:
        """A left-over job that cannot be resumed: its file goes to errors/ with the reason.
        If even that fails (errors/ unwritable), the job stays where it is for the next start,
        and the daemon serves on."""
        shown = names.escape(claim.relative)
        log.exception("%s/%s: cannot resume this job", inbox.config.name, shown)
        try:
            if claim.outcome and not os.path.lexists(claim.source):
                self.outcomes.close_archived(inbox, claim)  # only the record was left
                return
            if claim.outcome != "success":  # a published job is never filed as failed
                message = f"could not be resumed: {error}"
                self.outcomes.reject(inbox, claim, Reason.RECOVERY, message)
                return
        except Exception:
            log.exception("%s/%s: cannot file it in errors/ either", inbox.config.name, shown)
        log.error("%s/%s: left in %s for the next start", inbox.config.name, shown, claim.folder)
        self.pipeline.count(-1)  # not in flight: --once and the gauges must not wait for it

    # ----- gauges, heartbeats ------------------------------------------------------------

    def housekeeping(self) -> None:
        pipeline = self.pipeline
        self.observe_backlog()
        pipeline.inboxes.heartbeat(lambda inbox: not pipeline.inbox_away(inbox))
        pipeline.inboxes.close_retired(lambda inbox: inbox.claims.has_jobs())
        for inbox in pipeline.inboxes.active:
            cfg = inbox.config
            for folder, path in (("inbox", cfg.path), ("outbox", cfg.outbox),
                                 ("done", cfg.done), ("errors", cfg.errors)):  # fmt: skip
                if path is not None:
                    with contextlib.suppress(OSError):
                        free = shutil.disk_usage(path).free
                        pipeline.metrics.disk_free.labels(cfg.name, folder).set(free)
        memory.release_free_memory()  # photos of many sizes fragment the heap
        engine = pipeline.engine
        if engine.device.type == "cuda":
            import torch  # only a GPU's engine has loaded it; ONNX Runtime's CPU engine never does

            gpu = engine.device
            pipeline.metrics.gpu_memory.labels("allocated").set(
                torch.cuda.memory_allocated(str(gpu))
            )
            pipeline.metrics.gpu_memory.labels("reserved").set(torch.cuda.memory_reserved(str(gpu)))

    def observe_backlog(self) -> None:
        """Files in the inbox not claimed yet: not tracked yet, settling in the watcher, or
        ready and waiting for room in the pipeline (the watcher counts them all)."""
        pipeline = self.pipeline
        now = time.time()
        active = pipeline.inboxes.active
        oldest = {id(inbox): inbox.watcher.oldest_detected() or now for inbox in active}
        for inbox, ready in self.ready:  # one pass: a backlog can be long
            if id(inbox) in oldest:
                oldest[id(inbox)] = min(oldest[id(inbox)], ready.detected_at)
        for inbox in active:
            name = inbox.config.name
            pipeline.metrics.pending.labels(name).set(inbox.watcher.waiting_files())
            pipeline.metrics.oldest_pending.labels(name).set(now - oldest[id(inbox)])

    # ----- pausing -----------------------------------------------------------------------

    def check_roots(self, now: float) -> None:
        """A root that went away (share dropped, folder deleted) pauses intake until it is back:
        nothing is claimed from, or created in, a bare mountpoint."""
        pipeline = self.pipeline
        for inbox in pipeline.inboxes.active:
            for root in pipeline.roots_of(inbox.config).away():
                why = "missing, or not the filesystem it was on"
                pipeline.hold(root, roots.AWAY, now, 0, why)

    def probe_folders(self) -> None:
        """At start: every folder of every inbox must look writable before intake opens, so a
        daemon restarted while the disk is still full stays paused instead of claiming,
        decoding and failing to publish first. Nothing is written: readers of the outbox must
        never see a stray file (the probe that writes runs only once something failed)."""
        pipeline, now = self.pipeline, time.monotonic()
        for inbox in pipeline.inboxes.active:
            for root in pipeline.roots_of(inbox.config).roots:
                if not root.present():
                    pipeline.hold(root, roots.AWAY, now, 0, "missing")
                elif (error := roots.looks_writable(root.path)) is not None:
                    reason = PAUSE_REASONS.get(error.errno or 0, roots.AWAY)
                    pipeline.hold(root, reason, now, 0, error)
        self.show_pause()

    def probe(self, now: float) -> None:
        pipeline = self.pipeline
        for root in pipeline.pause.probe_due(now):
            log.info("%s can be written again", root.path)
        if not pipeline.pause.active:
            log.info("intake resumed")
            self.unpark()

    def show_pause(self) -> None:
        held = self.pipeline.pause.reasons()
        for reason in set(PAUSE_REASONS.values()):
            self.pipeline.metrics.paused.labels(reason).set(int(reason in held))

    def unpark(self) -> None:
        """Every root is back: each parked job is finished if its outcome was recorded, else
        its file goes back to the inbox, as its job folder now says. A job whose folder did not
        come back (a fresh share) is forgotten."""
        pipeline = self.pipeline
        with pipeline.parked_lock:
            parked, pipeline.parked = pipeline.parked, []
        for inbox in pipeline.inboxes.active:
            if not pipeline.inbox_away(inbox):
                with contextlib.suppress(OSError):
                    inbox.claims.open()  # a share back without our work folder needs it again
        for inbox, claim in parked:
            current = inbox.claims.reread(claim)
            if current is None:
                log.warning("%s/%s: its job did not come back with the inbox", inbox.config.name,
                            names.escape(claim.relative))  # fmt: skip
                continue
            if not current.outcome:
                pipeline.count(+1)
                self.outcomes.release(inbox, current)
                continue
            try:
                self._resume(inbox, current)  # file the original where its outcome sends it
            except OSError as exc:
                if not self.outcomes.cannot_continue(inbox, current, exc):
                    raise

    # ----- SIGHUP ------------------------------------------------------------------------

    def reload(self) -> None:
        """Apply a new config, or refuse it and keep the running one."""
        pipeline = self.pipeline
        metrics, running = pipeline.metrics, pipeline.config
        source = running.source
        try:
            if source is None:
                raise config.ConfigError("the daemon was started without a config file")
            new = config.load(source)
            config.ensure_folders(new)
        except config.ConfigError as exc:
            log.error("config reload refused, the running config stays: %s", exc)
            metrics.reloads.labels("failure").inc()
            metrics.reload_ok.set(0)
            return
        changed = [s for s in RESTART_ONLY if getattr(new, s) != getattr(running, s)]
        if changed:
            log.warning(
                "config reload: changes to %s apply at the next restart", ", ".join(changed)
            )
        pipeline.config = replace(new, **{s: getattr(running, s) for s in RESTART_ONLY})
        pipeline.inboxes.apply(new.inboxes)
        self.ready = deque((i, r) for i, r in self.ready if i in pipeline.inboxes.active)
        in_use = pipeline.inboxes.active + pipeline.inboxes.retiring
        # A pause on a folder no inbox uses any more would never lift.
        pipeline.pause.keep_only(r for i in in_use for r in pipeline.roots_of(i.config).roots)
        metrics.reloads.labels("success").inc()
        metrics.reload_ok.set(1)
        log.info("config reloaded from %s: %d inbox(es)", source, len(pipeline.inboxes.active))
