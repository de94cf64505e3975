"""The one path resolver: names from downloaded files never reach outside their directory."""

from __future__ import annotations

import os

import pytest

from moeport.models.paths import UnsafePathError, check_name, hub_blobs, open_inside, resolve_inside


@pytest.mark.parametrize(
    "name",
    ["../x", "a/../../x", "/etc/passwd", "", ".", "a//b", "a/./b", "a\\b", "x\x00y", "C:/x", 7, None, ["a"]],
)
def test_names_that_are_not_plain_relative_paths_are_refused(name):
    with pytest.raises(UnsafePathError):
        check_name(name)


@pytest.mark.parametrize("name", ["model.onnx", "compiled/tvm-1/lib.so", "a b.json"])
def test_plain_names_pass(name):
    assert check_name(name) == name


def test_symlink_leaving_the_directory_is_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s")
    d = tmp_path / "art"
    d.mkdir()
    (d / "link").symlink_to(secret)
    (d / "inner").write_text("i")
    (d / "ok-link").symlink_to("inner")
    with pytest.raises(UnsafePathError, match="outside"):
        open_inside(d, "link")
    fd, st = open_inside(d, "ok-link")  # a symlink that stays inside is followed
    assert os.read(fd, 10) == b"i"
    os.close(fd)


def test_directory_and_missing_files(tmp_path):
    (tmp_path / "sub").mkdir()
    with pytest.raises(UnsafePathError, match="not a regular file"):
        open_inside(tmp_path, "sub")
    with pytest.raises(FileNotFoundError):
        open_inside(tmp_path, "nope")


def test_hub_cache_snapshots_may_point_into_their_blobs(tmp_path):
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (repo / "blobs" / "f00").write_text("{}")
    (snap / "config.json").symlink_to("../../blobs/f00")
    assert hub_blobs(snap) == repo / "blobs"
    with pytest.raises(UnsafePathError):
        resolve_inside(snap, "config.json")
    assert resolve_inside(snap, "config.json", also=[repo / "blobs"]) == repo / "blobs" / "f00"
