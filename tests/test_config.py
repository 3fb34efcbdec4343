"""Configuration: the shipped default works, every mistake names its key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hotfolder import config, recipes

from .conftest import ROOT


def test_shipped_config_is_valid_and_lives_under_data() -> None:
    cfg = config.load(ROOT / "config.yaml")
    assert cfg.model.weights == ROOT / "weights" / "u2netp.safetensors"
    assert cfg.inboxes
    for inbox in cfg.inboxes:
        assert (ROOT / "data") in inbox.path.parents
        assert inbox.outputs


def base_inbox(tmp_path: Path) -> dict[str, object]:
    return {
        "name": "products",
        "path": str(tmp_path / "inbox"),
        "outbox": str(tmp_path / "outbox"),
        "done": str(tmp_path / "done"),
        "errors": str(tmp_path / "errors"),
    }


def parse(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return config.load(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "model: {nmae: u2netp}",
            "model.nmae: unknown key; known keys here: compile, compile_cache, cpu_threads",
        ),
        ("batching: {max_batch_size: many}", "batching.max_batch_size: expected int, got 'many'"),
        ("batching: {max_batch_size: 0}", "batching.max_batch_size: must be at least 1"),
        ("batching: {max_wait_ms: true}", "batching.max_wait_ms: expected int, got True"),
        (
            "model: {precision: fp8}",
            "model.precision: 'fp8' is not one of auto, fp32, fp16, bf16, bf16-mixed, int8-mixed",
        ),
        ("model: {cpu_threads: -1}", "model.cpu_threads: must be 0 or more, got -1"),
        ("metrics: {thumbnails_mb: -1}", "metrics.thumbnails_mb: must be 0 or more, got -1"),
        ("model: {compile: yes please}", "model.compile: expected bool, got 'yes please'"),
        ("limits: {max_pixels: 2000000000}", "limits.max_pixels: at most 1073741824"),
        ("model: [u2netp]", "model: expected a mapping"),
        ("journl: x.db", "journl: unknown key"),
        ("model: {name: u2netp", "not valid YAML"),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(")):
        parse(tmp_path, text)


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    cfg = parse(tmp_path, "model: {weights: w/x.safetensors}\njournal: data/j.sqlite3\n")
    assert cfg.model.weights == tmp_path / "w" / "x.safetensors"
    assert cfg.journal == tmp_path / "data" / "j.sqlite3"


def test_inbox_outputs_and_names(tmp_path: Path) -> None:
    inbox = base_inbox(tmp_path) | {
        "outputs": [
            {"kind": "cutout"},
            {"kind": "mask", "compression": 9},
            {"kind": "composite", "background": "#fff", "quality": 85},
            {
                "kind": "composite",
                "background": "0,0,0",
                "format": "png",
                "name": "{stem}.black.png",
            },
        ]
    }
    cfg = parse(tmp_path, yaml.safe_dump({"inboxes": [inbox]}))
    assert cfg.inboxes[0].incomplete_grace_ms == 60_000  # the default
    names = [o.filename("shoe", ".jpg") for o in cfg.inboxes[0].outputs]
    assert names == ["shoe.png", "shoe.mask.png", "shoe.jpg", "shoe.black.png"]
    assert cfg.inboxes[0].outputs[3].background == (0, 0, 0)
    assert [o.compression for o in cfg.inboxes[0].outputs] == ["fast", 9, "fast", "fast"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"outbox": "{inbox}/out"}, r"inboxes\[products\].outbox: .* is inside the inbox"),
        ({"outputs": [{"kind": "cutout"}, {"kind": "cutout"}]}, "the same file name"),
        ({"outputs": [{"kind": "cutout", "format": "jpg"}]}, "format: 'jpg' for cutout; use png"),
        (
            {"outputs": [{"kind": "sticker"}]},
            "kind: 'sticker' is not one of cutout, mask, composite",
        ),
        ({"outputs": [{"kind": "composite", "background": "#12"}]}, "is not a colour"),
        ({"outputs": [{"kind": "mask", "name": "../{stem}.png"}]}, "may not contain a folder"),
        ({"outputs": [{"kind": "mask", "name": "mask.png"}]}, "must contain {stem}"),
        ({"outputs": [{"kind": "mask", "compression": 10}]}, "fast or a level 0–9, got 10"),
        ({"outputs": [{"kind": "mask", "compression": "best"}]}, "fast or a level 0–9, got 'best'"),
        ({"outputs": [{"kind": "mask", "name": "{stem:.3}.png"}]}, "without a format"),
        ({"outputs": [{"kind": "mask", "name": "{stem!r}.png"}]}, "without a format"),
        ({"outputs": [{"kind": "mask", "name": "{stem"}]}, "is not a template"),
        ({"outputs": [{"kind": "mask", "name": "{stem}" + "x" * 240}]}, "leaves no room"),
        ({"collisions": "overwrite"}, "collisions: 'overwrite' is not one of suffix"),
        ({"file_mode": 644}, r"file_mode: expected an octal mode in quotes such as \"0644\""),
        ({"dir_mode": "0999"}, "dir_mode: expected an octal mode"),
        ({"group": "no-such-group-here"}, "no group named"),
        ({"originals": "shred"}, "originals: 'shred' is not one of move, delete"),
        ({"name": "my inbox"}, "must be letters, digits"),
        ({"incomplete_grace_ms": -1}, r"inboxes\[0\].incomplete_grace_ms: must be 0 or more"),
        ({"incomplete_grace_ms": "1m"}, r"incomplete_grace_ms: expected int, got '1m'"),
    ],
)
def test_inbox_mistakes(tmp_path: Path, change: dict[str, object], message: str) -> None:
    inbox = base_inbox(tmp_path)
    inbox.update(change)
    if isinstance(inbox["outbox"], str):
        inbox["outbox"] = inbox["outbox"].replace("{inbox}", str(inbox["path"]))
    with pytest.raises(config.ConfigError, match=message):
        parse(tmp_path, yaml.safe_dump({"inboxes": [inbox]}))


def test_two_inboxes_on_one_folder_are_refused(tmp_path: Path) -> None:
    one = base_inbox(tmp_path)
    two = base_inbox(tmp_path) | {"name": "second", "path": str(tmp_path / "inbox" / "sub")}
    with pytest.raises(config.ConfigError, match="overlap"):
        parse(tmp_path, yaml.safe_dump({"inboxes": [one, two]}))


def test_layouts_that_would_eat_their_own_files_are_refused(tmp_path: Path) -> None:
    inbox = base_inbox(tmp_path)
    journal = f"{inbox['path']}/journal.sqlite3"
    with pytest.raises(config.ConfigError, match=r"journal: .* is inside the inbox"):
        parse(tmp_path, yaml.safe_dump({"inboxes": [inbox], "journal": journal}))
    inside_outbox = base_inbox(tmp_path) | {"path": f"{inbox['outbox']}/in"}
    with pytest.raises(config.ConfigError, match=r"path: .* is inside the outbox folder"):
        parse(tmp_path, yaml.safe_dump({"inboxes": [inside_outbox]}))
    second = base_inbox(tmp_path) | {"name": "second", "path": str(tmp_path / "second"),
                                     "errors": f"{inbox['path']}/errors"}  # fmt: skip
    with pytest.raises(config.ConfigError, match=r"second\].errors: .* is inside the inbox"):
        parse(tmp_path, yaml.safe_dump({"inboxes": [inbox, second]}))


def test_originals_deleted_need_no_done_folder(tmp_path: Path) -> None:
    inbox = base_inbox(tmp_path) | {"originals": "delete"}
    del inbox["done"]
    cfg = parse(tmp_path, yaml.safe_dump({"inboxes": [inbox]}))
    assert cfg.inboxes[0].done is None


@pytest.mark.parametrize(
    ("text", "rgb"),
    [
        ("#ffffff", (255, 255, 255)),
        ("#0f0", (0, 255, 0)),
        ("10, 20, 30", (10, 20, 30)),
        ("black", (0, 0, 0)),
    ],
)
def test_colours(text: str, rgb: tuple[int, int, int]) -> None:
    assert recipes.parse_colour(text) == rgb


def test_compile_cache_is_systemds_cache_directory_when_it_gives_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/hotfolder")
    cfg = parse(tmp_path, "model: {compile: true}")
    assert cfg.model.compile
    assert cfg.model.compile_cache == Path("/var/cache/hotfolder/torch-compile")
    monkeypatch.delenv("CACHE_DIRECTORY")
    assert parse(tmp_path, "{}").model.compile_cache.parts[-3:] == (
        ".cache", "hotfolder", "torch-compile",
    )  # fmt: skip
    cfg = parse(tmp_path, "model: {compile_cache: kernels}")
    assert cfg.model.compile_cache == tmp_path / "kernels"
