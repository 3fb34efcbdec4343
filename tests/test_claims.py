"""The claim protocol on real files: one winner, recovery of a dead daemon's jobs."""

from __future__ import annotations

import json
from pathlib import Path

from hotfolder.claims import ClaimStore, owner_name

from .daemon import dead_owner


def store(inbox: Path, owner: str | None = None) -> ClaimStore:
    claims = ClaimStore("t", inbox, owner)
    claims.open()
    return claims


def test_only_one_daemon_wins_a_file(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"photo")
    first, second = store(tmp_path), store(tmp_path)
    claim = first.claim("a.jpg", 0.0)
    assert claim is not None
    assert second.claim("a.jpg", 0.0) is None
    assert claim.source.read_bytes() == b"photo"
    assert not (tmp_path / "a.jpg").exists()
    # The loser left nothing behind.
    assert list(second.mine.iterdir()) == []


def test_attempts_are_persisted(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"photo")
    claims = store(tmp_path)
    first = claims.record_attempt(claims.claim("a.jpg", 0.0), persist=True)  # type: ignore[arg-type]
    claim = claims.record_attempt(first, persist=True)
    saved = json.loads((claim.folder / "job.json").read_text())
    assert saved["attempts"] == 2
    assert saved["relative"] == "a.jpg"


def test_release_puts_the_file_back(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jpg").write_bytes(b"photo")
    claims = store(tmp_path)
    claim = claims.claim("sub/a.jpg", 0.0)
    assert claim is not None
    assert claims.release(claim)
    assert (tmp_path / "sub" / "a.jpg").read_bytes() == b"photo"
    assert not claim.folder.exists()


def test_jobs_of_a_dead_daemon_are_adopted_with_their_attempts(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"photo")
    dead = store(tmp_path, dead_owner())
    claim = dead.record_attempt(dead.claim("a.jpg", 5.0), persist=True)  # type: ignore[arg-type]
    survivor = store(tmp_path)
    adopted = survivor.recover()
    assert [(c.job_id, c.relative, c.attempts) for c in adopted] == [(claim.job_id, "a.jpg", 1)]
    assert adopted[0].source.read_bytes() == b"photo"
    assert not dead.mine.exists()


def test_jobs_of_a_live_daemon_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"photo")
    alive = store(tmp_path)
    assert alive.claim("a.jpg", 0.0) is not None
    assert store(tmp_path).recover() == []


def test_a_claim_that_never_took_the_file_is_cleaned_up(tmp_path: Path) -> None:
    dead = store(tmp_path, dead_owner())
    folder = dead.mine / "abc"
    folder.mkdir()
    (folder / "job.json").write_text(json.dumps({
        "job_id": "abc", "inbox": "t", "relative": "a.jpg", "size": 5, "detected_at": 0.0,
        "claimed_at": 0.0, "attempts": 0, "outcome": "",
    }))  # fmt: skip
    assert store(tmp_path).recover() == []
    assert not folder.exists()


def test_owner_names_are_unique() -> None:
    assert owner_name() != owner_name()
