"""Output paths are checked before any work and named as given; files are written whole or not at all,
and the path printed is the path written."""

from pathlib import Path

import pytest
from conftest import invoke_cli

from mechscope.cli_common import atomic_output, check_folder, check_output
from mechscope.errors import MechscopeError

PROMPT = "The reliability of Wikipedia is very"


def run_main(monkeypatch, capsys, load, *argv):
    """Run the CLI in-process with `load` as the model loader; (exit code, stdout, stderr)."""
    return invoke_cli(monkeypatch, capsys, *argv, load=load)


def not_loaded(*args):
    raise AssertionError("the model was loaded before the output path was checked")


def bad_outputs(folder):
    (folder / "a-file").write_text("")
    (folder / "sub").mkdir()
    return [
        (["lens", PROMPT, "-t", " x", "--html", str(folder)], f"--html {str(folder)!r} is a folder: give a file path, such as"),
        (["lens", PROMPT, "-t", " x", "--png", str(folder)], f"--png {str(folder)!r} is a folder: give a file path, such as"),
        (
            ["lens", PROMPT, "-t", " x", "--png", str(folder / "lens.jpg")],
            "lens.jpg' does not end in .png: give a file name such as 'lens.png'",
        ),
        (["lens", PROMPT, "-t", " x", "--html", str(folder / "a-file" / "x.html")], "x.html' cannot be written: "),
        (["neuron", "1:1", PROMPT, "--html", str(folder / "sub")], "--html"),
        (["neuron", "1:1", PROMPT, "--png", str(folder / "sub")], "--png"),
        (["pattern", "1.1", PROMPT, "--html", str(folder / "sub")], "--html"),
        (["pattern", "1.1", PROMPT, "--png", str(folder / "p")], "--png"),
        (["patch", "--clean", "a", "--corrupt", "b", "-t", " x", "--html", str(folder)], "--html"),
        (["read", PROMPT, "-s", "blocks.1.hook_resid_post", "--out", str(folder)], f"--out {str(folder)!r} is a folder"),
        (["demo", "--out", str(folder / "a-file")], f"--out {str(folder / 'a-file')!r} is a file: give a folder"),
    ]


def test_bad_output_paths_are_refused_before_any_work(monkeypatch, capsys, tmp_path):
    for argv, message in bad_outputs(tmp_path):
        before = sorted(tmp_path.rglob("*"))
        code, out, err = run_main(monkeypatch, capsys, not_loaded, *argv)
        assert code == 2 and not out, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (argv, err)
        assert sorted(tmp_path.rglob("*")) == before, "a refused command left a file behind"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_unwritable_folder_is_named_as_given(monkeypatch, capsys):
    with pytest.raises(MechscopeError, match=r"^--html '/proc/x.html' cannot be written: '/proc' is not writable"):
        check_output("--html", "/proc/x.html")
    code, out, err = run_main(monkeypatch, capsys, not_loaded, "lens", PROMPT, "-t", " x", "--html", "/proc/x.html")
    assert code == 2 and not out
    assert err.strip().startswith("error: --html '/proc/x.html' cannot be written: '/proc' is not writable (")
    assert len(err.strip().splitlines()) == 1


def test_missing_folders_are_fine_and_special_files_are_not(tmp_path):
    assert check_output("--png", tmp_path / "new" / "deeper" / "x.png", ".png") == tmp_path / "new" / "deeper" / "x.png"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert check_folder("--out", tmp_path / "reports") == tmp_path / "reports"
    with pytest.raises(MechscopeError, match=r"^--out '/dev/null' is not a regular file"):
        check_output("--out", "/dev/null")
    assert check_output("--html", None) is None


def test_atomic_output_leaves_the_file_whole_or_nothing(tmp_path):
    path = tmp_path / "out" / "acts.safetensors"
    with atomic_output(path) as tmp:
        assert tmp.parent == path.parent and tmp.suffix == ".safetensors" and tmp.name.startswith(".acts.")
        tmp.write_text("whole")
    assert path.read_text() == "whole" and [p.name for p in path.parent.iterdir()] == ["acts.safetensors"]
    with pytest.raises(OSError), atomic_output(path) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert path.read_text() == "whole" and [p.name for p in path.parent.iterdir()] == ["acts.safetensors"]


@pytest.mark.slow
def test_written_paths_are_printed_and_nothing_else_is_left(monkeypatch, capsys, tmp_path, smollm2):
    load = lambda *args: smollm2
    folder = tmp_path / "new" / "reports"
    html, png = folder / "lens.html", folder / "lens.png"
    code, out, _ = run_main(
        monkeypatch, capsys, load, "lens", PROMPT, "-t", " questionable", "--html", str(html), "--png", str(png)
    )
    assert code == 0
    assert f"HTML report: {html}" in out and f"PNG: {png}" in out
    assert sorted(p.name for p in folder.iterdir()) == ["lens.html", "lens.png"]
    assert png.read_bytes()[:4] == b"\x89PNG"

    acts = folder / "acts.safetensors"
    code, out, _ = run_main(monkeypatch, capsys, load, "read", PROMPT, "-s", "blocks.1.hook_resid_post", "--out", str(acts))
    assert code == 0 and f"saved 1 tensors to {acts}" in out
    assert sorted(p.name for p in folder.iterdir()) == ["acts.safetensors", "lens.html", "lens.png"]


@pytest.mark.slow
def test_a_failed_write_leaves_nothing_behind(monkeypatch, capsys, tmp_path, smollm2):
    import safetensors.torch

    def fail_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fail_halfway)
    out_path = tmp_path / "acts.safetensors"
    argv = ["read", PROMPT, "-s", "blocks.1.hook_resid_post", "--out", str(out_path)]
    code, _, err = run_main(monkeypatch, capsys, lambda *args: smollm2, *argv)
    assert code == 1 and "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
