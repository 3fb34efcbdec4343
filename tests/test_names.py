"""File names as bytes: lossless escaping, NAME_MAX, output-name collisions, safe folders."""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path, PurePosixPath

import pytest

from hotfolder import names, naming, publish, recipes
from hotfolder.journal import Journal

LATIN1 = os.fsdecode(b"caf\xe9.jpg")  # as an old Windows or Samba client writes it
HAN_80 = "字" * 80 + ".jpg"  # 243 bytes


def test_escape_is_lossless_and_plain_text() -> None:
    rng = random.Random(7)
    for _ in range(500):
        raw = bytes(rng.choice([*range(1, 47), *range(48, 256)]) for _ in range(rng.randint(1, 40)))
        name = os.fsdecode(raw)
        text = names.escape(name)
        assert text.encode("utf-8")  # valid UTF-8: SQLite and JSON take it
        assert not any(ord(c) < 32 for c in text)  # one log line
        assert os.fsencode(names.unescape(text)) == raw


def test_escape_shows_the_bytes() -> None:
    assert names.escape(LATIN1) == "caf\\xe9.jpg"
    assert names.escape("line\nbreak.jpg") == "line\\x0abreak.jpg"
    assert names.escape("back\\slash.jpg") == "back\\\\slash.jpg"
    assert names.escape("café 字.jpg") == "café 字.jpg"


def test_escape_shows_invisible_and_direction_controls_as_bytes() -> None:
    # U+202E would show "photo-\u202egpj.exe" as "photo-exe.jpg"; U+0085 is a C1 line break.
    for name, shown in [("photo-\u202egpj.exe", "photo-\\xe2\\x80\\xaegpj.exe"),
                        ("a\u2066b\u200fc.jpg", "a\\xe2\\x81\\xa6b\\xe2\\x80\\x8fc.jpg"),
                        ("next\x85line.jpg", "next\\xc2\\x85line.jpg")]:  # fmt: skip
        assert names.escape(name) == shown
        assert names.unescape(shown) == name
        assert names.printable(f"cannot read {name}") == f"cannot read {shown}"


@pytest.mark.parametrize("stem", ["x" * 300, "字" * 100, "é" * 200, os.fsdecode(b"\xe9" * 300)])
def test_fit_cuts_the_stem_on_a_character_boundary(stem: str) -> None:
    name = names.fit(stem, ".mask.png")
    assert names.byte_length(name) <= 255
    assert name.endswith(".mask.png")
    assert stem.startswith(name.removesuffix(".mask.png"))  # whole characters only
    assert names.fit(stem, ".mask.png") == name  # deterministic


def test_every_output_name_fits_name_max() -> None:
    for kind in recipes.Kind:
        output = recipes.Output(kind)
        for stem in ("x" * 251, "字" * 84, os.fsdecode(b"\xe9" * 251)):
            for tag in ("", "-2", "-999"):
                name = output.filename(stem, ".jpg", tag)
                assert names.byte_length(name) <= 255, (kind, tag)
                assert tag + "." in name or not tag


def test_archive_and_error_names_with_a_job_tag_fit(tmp_path: Path) -> None:
    long_good = "g" * 251 + ".jpg"  # 255 bytes
    (tmp_path / "done").mkdir()
    for name in (long_good, HAN_80):
        for _ in range(2):  # the second upload gets the job tag
            source = tmp_path / "source"
            source.write_bytes(b"photo")
            placed = publish.archive(source, tmp_path / "done", name, "0123abcd")
            assert names.byte_length(placed.name) <= 255
            sidecar = publish.error_report_name(placed.name, "0123abcd")
            assert names.byte_length(sidecar) <= 255
            assert sidecar.endswith(".error.json")
    archived = sorted(p.name for p in (tmp_path / "done").iterdir())
    assert len(archived) == 4
    assert long_good in archived
    assert HAN_80 in archived


def test_collisions_suffix_policy_keeps_both_and_replaces_its_own(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    outputs = (recipes.Output(recipes.Kind.CUTOUT), recipes.Output(recipes.Kind.MASK))
    on_disk: set[str] = set()

    def choose(relative: str, policy: naming.Collision = naming.Collision.SUFFIX) -> list[str]:
        paths = naming.choose(
            outputs, relative, policy, f"products:{relative}", journal, str, on_disk.__contains__
        )
        return [str(p) for p in paths]

    assert choose("a/item.jpg") == ["a/item.png", "a/item.mask.png"]
    assert choose("a/item.png") == ["a/item-2.png", "a/item-2.mask.png"]
    assert choose("a/item.jpg") == ["a/item.png", "a/item.mask.png"]  # a re-upload: its own
    assert choose("a/x_y.jpg") == ["a/x_y.png", "a/x_y.mask.png"]
    assert choose("a/x\ny.jpg") == ["a/x_y-2.png", "a/x_y-2.mask.png"]
    assert choose("b/item.png") == ["b/item.png", "b/item.mask.png"]  # another folder
    on_disk.add("c/photo.png")  # a file nobody registered (put there by hand)
    assert choose("c/photo.jpg") == ["c/photo-2.png", "c/photo-2.mask.png"]
    with pytest.raises(naming.NameCollisionError):
        choose("a/item.webp", naming.Collision.ERROR)
    assert choose("a/item.tif", naming.Collision.REPLACE) == ["a/item.png", "a/item.mask.png"]
    assert choose("a/item.jpg") == ["a/item-3.png", "a/item-3.mask.png"]  # replaced: lost it
    journal.close()


def test_journal_reservations_are_shared_between_daemons(tmp_path: Path) -> None:
    first, second = Journal(tmp_path / "j.sqlite3"), Journal(tmp_path / "j.sqlite3")
    assert first.reserve("products:item.jpg", ["item.png"], lambda _: False)
    assert not second.reserve("products:item.png", ["item.png"], lambda _: False)
    assert second.reserve("products:item.jpg", ["item.png"], lambda _: True)  # its own
    first.close()
    second.close()
    with sqlite3.connect(tmp_path / "j.sqlite3") as db:
        assert db.execute("SELECT owner FROM output_names").fetchall() == [("products:item.jpg",)]


def test_writes_never_go_through_a_symbolic_link(tmp_path: Path) -> None:
    outbox, elsewhere = tmp_path / "outbox", tmp_path / "elsewhere"
    outbox.mkdir()
    elsewhere.mkdir()
    (outbox / "evil").symlink_to(elsewhere)
    (outbox / "plain").write_text("a file where a folder should be")
    staging = tmp_path / "staging"
    refusals = {"evil": publish.UnsafePathError, "evil/deeper": publish.UnsafePathError,
                "plain": publish.NameTakenError}  # fmt: skip
    for folder, refusal in refusals.items():
        with pytest.raises(refusal):
            publish.place_outputs([(PurePosixPath(folder) / "x.png", b"png")], outbox, staging)
        with pytest.raises(refusal):
            publish.write_error_report(outbox, f"{folder}/x.jpg", "tag", {"reason": "corrupt"})
    source = tmp_path / "original.jpg"
    source.write_bytes(b"photo")
    with pytest.raises(publish.UnsafePathError):
        publish.archive(source, outbox, "evil/original.jpg", "tag")
    assert list(elsewhere.iterdir()) == []
    assert source.exists()


def test_modes_and_group_are_explicit_whatever_the_umask(tmp_path: Path) -> None:
    perms = publish.Permissions(file_mode=0o640, dir_mode=0o2750, gid=os.getgid())
    old = os.umask(0o077)
    try:
        staging = tmp_path / "staging"
        publish.place_outputs([(PurePosixPath("a/b/x.png"), b"png")], tmp_path, staging, perms)
        publish.write_error_report(tmp_path, "a/c/y.jpg", "tag", {"reason": "corrupt"}, perms)
    finally:
        os.umask(old)
    for folder in ("a", "a/b", "a/c"):
        assert (tmp_path / folder).stat().st_mode & 0o7777 == 0o2750, folder
    for file in ("a/b/x.png", "a/c/y.jpg.error.json"):
        info = (tmp_path / file).stat()
        assert (info.st_mode & 0o7777, info.st_gid) == (0o640, os.getgid()), file
