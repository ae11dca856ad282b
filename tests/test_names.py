"""Output names (hash3d_dg.output.names): one folder name that stays inside the output root and that the
root's file system can hold with every file and staging name derived from it; and a commit that
fails on an OS error removes its staging folder and leaves the earlier result as it was."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from hash3d_dg.output import folder as outputs
from hash3d_dg.output.atomic import atomic_path
from hash3d_dg.errors import ConfigError, OutputError
from hash3d_dg.mesh.export import _atomic_write
from hash3d_dg.output.names import (FILE_SUFFIXES, OVERHEAD, check_name, derived_names, max_name_bytes, name_max,
                             name_problem, output_names, slugify)
from hash3d_dg.output.folder import OutputFolder


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


BAD = {
    "empty": ("", "empty"),
    "dot": (".", "names a folder itself"),
    "dot dot": ("..", "names a folder itself"),
    "escape": ("../escape", "'/'"),
    "absolute": ("/tmp/x", "'/'"),
    "slash": ("a/b", "'/'"),
    "backslash": ("a\\b", "'\\'"),
    "NUL": ("a\x00b", "U+0000"),
    "newline": ("a\nb", "U+000A"),
    "tab": ("a\tb", "U+0009"),
    "DEL": ("a\x7fb", "U+007F"),
    "line separator": ("a\u2028b", "U+2028"),
    "undecodable byte": ("a\udcffb", "not valid text"),
    "hidden": (".ball", "starts with '.'"),
    "staging-like": (".ball.tmp-12345678", "starts with '.'"),
    "option-like": ("-rf", "starts with '-'"),
    "leading space": (" ball", "white space"),
    "trailing space": ("ball ", "white space"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_unusable_names_are_rejected_with_what_is_wrong(case, tmp_path):
    name, reason = BAD[case]
    assert reason in name_problem(name, tmp_path)
    with pytest.raises(ConfigError) as info:
        check_name(name, tmp_path, what="--name", fix="pass another --name")
    message = str(info.value)
    assert "\n" not in message and message.startswith("--name '")
    assert reason in message and "(pass another --name)" in message
    assert f"at most {max_name_bytes(tmp_path)} bytes" in message  # what is allowed
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["ball", "café box ü", "写真", "a.b", "cat_rgba", "x-1_2", "a b", "ball."])
def test_usable_names_pass(name, tmp_path):
    assert name_problem(name, tmp_path) is None
    assert check_name(name, tmp_path) == name


def test_too_long_counts_bytes_of_the_name_with_its_longest_derived_name(tmp_path):
    limit = max_name_bytes(tmp_path)
    assert limit == name_max(tmp_path) - OVERHEAD and OVERHEAD == 32
    assert name_problem("x" * limit, tmp_path) is None
    assert "bytes long" in name_problem("x" * (limit + 1), tmp_path)
    # Bytes, not characters: 'é' is two bytes in UTF-8.
    assert name_problem("é" * (limit // 2), tmp_path) is None
    assert f"{2 * (limit // 2 + 1)} bytes long" in name_problem("é" * (limit // 2 + 1), tmp_path)
    # A root that does not exist yet is measured on the folder that will hold it.
    assert max_name_bytes(tmp_path / "not" / "yet") == limit


def _write_every_file(folder: Path, name: str) -> None:
    """Each file a run writes, through both of the product's atomic writers (their temporaries
    are the longest names a run creates)."""
    for suffix in FILE_SUFFIXES:
        with atomic_path(folder / f"{name}{suffix}") as tmp:
            tmp.write_bytes(b"new")
        _atomic_write([(folder / f"{name}{suffix}", b"new")])


@pytest.mark.parametrize("char", ["x", "é"])
def test_the_longest_name_allowed_really_runs_and_one_byte_more_would_not(char, tmp_path, monkeypatch):
    limit = max_name_bytes(tmp_path)
    name = char * (limit // len(char.encode())) + "x" * (limit % len(char.encode()))
    assert len(name.encode()) == limit
    assert max(len(n.encode()) for n in derived_names(name)) == name_max(tmp_path)
    (tmp_path / name).mkdir()
    (tmp_path / name / "old.txt").write_text("earlier")
    with OutputFolder(tmp_path, name) as out:  # commit by exchange over the earlier result
        _write_every_file(out.staging, name)
        out.commit()
    monkeypatch.setattr(outputs, "_renameat2", None)  # a system without RENAME_EXCHANGE: two renames
    with OutputFolder(tmp_path, name) as out:
        _write_every_file(out.staging, name)
        out.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(name + s for s in FILE_SUFFIXES)
    # One byte more and the writers' temporaries no longer fit the file system: the limit is tight.
    longer = tmp_path / "longer"
    longer.mkdir()
    with pytest.raises(OSError) as info:
        with atomic_path(longer / f"{name}x_gaussians.ply") as tmp:
            tmp.write_bytes(b"")
    assert info.value.errno == errno.ENAMETOOLONG


def test_output_folder_refuses_an_unusable_name_before_writing(tmp_path):
    for name in ("a/b", "../escape", str(tmp_path / "abs"), ""):
        with pytest.raises(ConfigError):
            OutputFolder(tmp_path / "logs", name)
    assert list(tmp_path.iterdir()) == []


def test_output_names_of_inputs(tmp_path):
    images = []
    for fname in ("ball.png", "cat_rgba.png", "_rgba.png", "café ü.jpg"):
        (tmp_path / fname).write_bytes(b"")
        images.append(tmp_path / fname)
    assert output_names(images, tmp_path) == ["ball", "cat", "_rgba", "café ü"]
    assert output_names([images[0], images[0]], tmp_path) == ["ball", "ball"]  # one file twice
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "ball.png").symlink_to(images[0])
    assert output_names([images[0], tmp_path / "sub" / "ball.png"], tmp_path) == ["ball", "ball"]


@pytest.mark.parametrize("first, second", [("a.png", "a.jpg"), ("a.png", "a_rgba.png"), ("x/a.png", "y/a.png")])
def test_two_inputs_with_one_output_name_are_refused(first, second, tmp_path):
    paths = [tmp_path / first, tmp_path / second]
    for path in paths:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        output_names(paths, tmp_path)
    message = str(info.value)
    assert "same output folder 'a'" in message and str(paths[0]) in message and str(paths[1]) in message


@pytest.mark.parametrize("fname, reason", [("-x.png", "starts with '-'"), ("a\nb.png", "U+000A"),
                                           (" x.png", "white space"), ("y" * 230 + ".png", "bytes long")])
def test_an_input_whose_stem_is_unusable_is_refused_naming_the_file(fname, reason, tmp_path):
    image = tmp_path / fname
    image.write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        output_names([image], tmp_path)
    message = str(info.value)
    assert message.startswith("input ") and reason in message and message.endswith("(rename the file)")
    assert "\n" not in message


def test_reserved_names(tmp_path):
    image = tmp_path / "batch_report.json.png"
    image.write_bytes(b"")
    with pytest.raises(ConfigError, match="a file this run writes"):
        output_names([image], tmp_path, reserved=("batch_report.json",))


@pytest.mark.parametrize("text, slug", [
    ("A photo of a Café, on 2 tables!", "a-photo-of-a-cafe-on-2-tables"),
    ("../../etc/passwd", "etc-passwd"),
    ("  -- hidden .dot --  ", "hidden-dot"),
    ("", "prompt"),
    ("写真 !!!", "prompt"),
    ("Ünïcödé\nline\x00two", "unicode-line-two"),
])
def test_slugify(text, slug, tmp_path):
    assert slugify(text) == slug
    assert check_name(slugify(text), tmp_path)


def test_slugify_cuts_long_text_at_a_word_and_always_passes_the_check(tmp_path):
    slug = slugify("a red wooden chair " * 20)
    assert len(slug) <= 64 and slug.startswith("a-red-wooden-chair-") and not slug.endswith("-")
    assert set(slug.split("-")) == {"a", "red", "wooden", "chair"}
    assert slugify("x" * 300) == "x" * 64
    assert slugify("word " * 10, max_length=12) == "word-word"
    assert slugify("???", fallback="photo") == "photo"
    for text in ("a red wooden chair " * 20, "x" * 300, "\x00\n", "." * 50, "-" * 50):
        assert name_problem(slugify(text), tmp_path) is None


# ------------------------------------------------------------------ commit failures


def _earlier(root: Path) -> dict:
    (root / "ball").mkdir(parents=True)
    (root / "ball" / "ball.glb").write_bytes(b"an earlier result")
    return tree(root)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two renames"])
def test_a_failed_commit_removes_the_staging_and_keeps_the_earlier_result(exchange, tmp_path, monkeypatch):
    if not exchange:
        monkeypatch.setattr(outputs, "_renameat2", None)  # a system without RENAME_EXCHANGE
    before = _earlier(tmp_path)
    with OutputFolder(tmp_path, "ball") as out:
        out.path("ball.glb").write_bytes(b"new")
        for item in out.staging.iterdir():  # something else removes the hidden folder mid-run
            item.unlink()
        out.staging.rmdir()
        with pytest.raises(OutputError) as info:
            out.commit()
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "ball") in message and "untouched" in message
    assert tree(tmp_path) == before  # no staging or .old- folder left, the earlier result as it was


def test_a_failed_first_commit_leaves_nothing(tmp_path):
    with OutputFolder(tmp_path, "ball") as out:
        out.staging.rmdir()
        with pytest.raises(OutputError, match="cannot commit the result to"):
            out.commit()
    assert list(tmp_path.iterdir()) == []


def test_a_staging_folder_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot create a staging folder in"):
        with OutputFolder(blocker, "ball"):
            pass
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_output_errors_are_reported_as_the_users_line_not_an_internal_error():
    from hash3d_dg.pipeline import error_line

    line = error_line(OutputError("cannot commit the result to /x/ball (No space left on device)"), "ball.png")
    assert line == "error: cannot commit the result to /x/ball (No space left on device)"
