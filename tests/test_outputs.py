"""Outputs: folders are replaced only when they hold what dsg wrote, in one atomic step, and never lost."""

import os

import pytest

import dsg
from dsg import files
from dsg.files import atomic_directory, check_output_dir


def _guardrail_folder(path, marker):
    path.mkdir(exist_ok=True)  # a staging folder exists already
    (path / "guardrail.json").write_text('{"format": "dsg-guardrail"}')
    (path / "guardrail.safetensors").write_text(marker)


@pytest.fixture(params=[True, False], ids=["exchange", "two-renames"])
def old_guardrail(request, tmp_path, monkeypatch):
    """A guardrail folder "g" with marker "old", replaced in one exchange where the system allows it, else (the
    second parameter) by the two-rename fallback."""
    if not request.param:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    _guardrail_folder(tmp_path / "g", "old")
    return tmp_path / "g"


def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("b")
    if not files._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("renameat2 is not available here")
    assert (tmp_path / "a" / "x").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"


def test_an_own_artifact_is_replaced_whole_and_kept_when_the_block_fails(tmp_path, old_guardrail):
    target = old_guardrail
    with pytest.raises(RuntimeError), atomic_directory(target, "guardrail") as tmp:
        (tmp / "guardrail.safetensors").write_text("half")
        raise RuntimeError("crash while writing")
    assert (target / "guardrail.safetensors").read_text() == "old"
    with atomic_directory(target, "guardrail") as tmp:
        (tmp / "guardrail.json").write_text('{"format": "dsg-guardrail"}')
        (tmp / "guardrail.safetensors").write_text("new")
    assert (target / "guardrail.safetensors").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["g"]  # no staging or old folders left


def test_a_failed_second_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    target = tmp_path / "g"
    _guardrail_folder(target, "old")
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new folder's move into place
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", flaky)
    with pytest.raises(OSError), atomic_directory(target, "guardrail") as tmp:
        (tmp / "guardrail.safetensors").write_text("new")
    monkeypatch.setattr(files.os, "replace", real)
    assert (target / "guardrail.safetensors").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["g"]


def test_an_interrupt_while_moving_into_place_leaves_no_staging_folder(tmp_path, monkeypatch, old_guardrail):
    target = old_guardrail

    def interrupted(self):
        raise KeyboardInterrupt  # Ctrl-C, or SIGTERM turned into an exception by the CLI, after the block ended

    monkeypatch.setattr(atomic_directory, "_publishable", interrupted)
    with pytest.raises(KeyboardInterrupt), atomic_directory(target, "guardrail") as tmp:
        (tmp / "guardrail.safetensors").write_text("new")
    assert (target / "guardrail.safetensors").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["g"]


def test_a_folder_dsg_did_not_write_is_never_replaced(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(dsg.DSGError, match="does not hold a dsg guardrail"), atomic_directory(keep, "guardrail"):
        pass
    with pytest.raises(dsg.DSGError, match="does not hold"):
        check_output_dir(keep, "guardrail", overwrite=True)
    assert (keep / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", "guardrail") == tmp_path / "empty"  # an empty folder is fine
    assert check_output_dir(tmp_path / "new" / "deeper", "guardrail").name == "deeper"  # so is a new path
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_nothing_is_written_inside_a_guardrail_but_a_path_through_one_may_lead_out(tmp_path):
    """A guardrail's SAE copy or any folder inside it is refused as an output; `guard/../elsewhere` is not inside."""
    _guardrail_folder(tmp_path / "guard", "g")
    with pytest.raises(dsg.DSGError, match="lies inside"):
        check_output_dir(tmp_path / "guard" / "sae", "SAE", overwrite=True)
    with pytest.raises(dsg.DSGError, match="lies inside"):
        check_output_dir(tmp_path / "guard" / "new", "guardrail")
    assert check_output_dir(tmp_path / "guard" / ".." / "elsewhere", "guardrail").name == "elsewhere"


def test_a_folder_that_only_borrows_dsgs_file_names_is_never_replaced(tmp_path):
    """--overwrite replaces what dsg wrote: the file names alone do not make a folder ours."""
    cases = {
        "demo": {"results.json": '{"accuracy": 1}', "report.md": "my notes"},  # a user's own results
        "SAE": {"cfg.json": "not json", "sae_weights.safetensors": "x"},
        "guardrail": {"guardrail.json": '{"format": "dsg-guardrail"}', "guardrail.safetensors": "x", "sae": "a file"},
    }
    for kind, entries in cases.items():
        keep = tmp_path / kind
        keep.mkdir()
        for name, text in entries.items():
            (keep / name).write_text(text)
        with pytest.raises(dsg.DSGError, match=f"does not hold a dsg {kind}"):
            check_output_dir(keep, kind, overwrite=True)
        assert sorted(os.listdir(keep)) == sorted(entries)
    demo = tmp_path / "demo2"  # a demo folder whose guardrail/ is someone else's folder
    demo.mkdir()
    (demo / "results.json").write_text('{"dsg_version": "0.1.0", "fit_config": {}}')
    (demo / "guardrail").mkdir()
    (demo / "guardrail" / "photos.txt").write_text("mine")
    with pytest.raises(dsg.DSGError, match="does not hold a dsg demo"):
        check_output_dir(demo, "demo", overwrite=True)
    (demo / "guardrail" / "photos.txt").unlink()
    _guardrail_folder(demo / "guardrail2", "g")
    os.rmdir(demo / "guardrail")
    os.rename(demo / "guardrail2", demo / "guardrail")
    assert check_output_dir(demo, "demo", overwrite=True) == demo  # what dsg writes is still replaced


def test_user_files_deeper_inside_a_dsg_folder_keep_it_from_being_replaced(tmp_path):
    """A demo's guardrail/sae/ and a comparison's runs/<method>/<key>.edit/ are checked to their last file: a
    user's note kept there made the whole folder read as ours, and --overwrite deleted it."""
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "results.json").write_text('{"dsg_version": "0.1.0", "fit_config": {}}')
    _guardrail_folder(demo / "guardrail", "g")
    sae = demo / "guardrail" / "sae"
    sae.mkdir()
    (sae / "cfg.json").write_text('{"d_in": 4, "d_sae": 8}')
    (sae / "sae_weights.safetensors").write_text("x")
    assert check_output_dir(demo, "demo", overwrite=True) == demo  # what dsg writes is replaced
    (sae / "MY_THESIS_NOTES.txt").write_text("mine")
    with pytest.raises(dsg.DSGError, match="does not hold a dsg demo"):
        check_output_dir(demo, "demo", overwrite=True)
    assert (sae / "MY_THESIS_NOTES.txt").read_text() == "mine"

    out = tmp_path / "cmp"
    edit = out / "runs" / "rmu" / "0123abcd.edit"
    edit.mkdir(parents=True)
    for name in ("compare.json", "report.html"):
        (out / name).write_text("{}")
    (out / "runs" / "rmu" / "0123abcd.json").write_text("{}")
    (edit / "edit.json").write_text('{"format": "dsg-edit"}')
    (edit / "edit.safetensors").write_text("x")
    assert check_output_dir(out, "comparison", overwrite=True) == out
    (edit / "notes.txt").write_text("mine")
    with pytest.raises(dsg.DSGError, match="does not hold a dsg comparison"):
        check_output_dir(out, "comparison", overwrite=True)


def test_an_output_another_process_wrote_meanwhile_is_not_replaced(tmp_path):
    """Two commands with one --out: each checked the path when it started; the one that finishes second must not
    silently replace what the first one reported as written."""
    from dsg.files import check_output_file, write_text_atomic

    target = tmp_path / "g"
    check_output_dir(target, "guardrail")  # this command starts: nothing there
    _guardrail_folder(target, "the other process's result")  # another one finishes first
    with pytest.raises(dsg.DSGError, match="written by another process"), atomic_directory(target, "guardrail") as tmp:
        (tmp / "guardrail.json").write_text('{"format": "dsg-guardrail"}')
    assert (target / "guardrail.safetensors").read_text() == "the other process's result"
    assert sorted(os.listdir(tmp_path)) == ["g"]
    # what this process itself wrote it may write again (a later save in the same run)
    check_output_dir(tmp_path / "h", "guardrail")
    for marker in ("first", "second"):
        with atomic_directory(tmp_path / "h", "guardrail") as tmp:
            _guardrail_folder(tmp, marker)
    assert (tmp_path / "h" / "guardrail.safetensors").read_text() == "second"
    # one file (dsg eval --out)
    summary = tmp_path / "s.json"
    check_output_file(summary)
    summary.write_text('{"from": "the other process"}')
    with pytest.raises(dsg.DSGError, match="written by another process"):
        write_text_atomic(summary, '{"from": "this one"}')
    assert "the other process" in summary.read_text()


_CHECK_CLAIM = files._check_claim


def _lands_after_the_check(monkeypatch, write):
    """Another process's result lands between this one's claim check and its move into place."""

    def check_then_lose_the_race(path):
        _CHECK_CLAIM(path)
        write()

    monkeypatch.setattr(files, "_check_claim", check_then_lose_the_race)


@pytest.mark.parametrize("was_there", [False, True], ids=["new", "overwrite"])
def test_an_output_written_between_the_check_and_the_move_is_not_replaced(tmp_path, monkeypatch, was_there):
    """The claim holds to the move itself (renameat2), not only to the check just before it."""
    from dsg.files import check_output_file, write_text_atomic

    (tmp_path / "a").write_text("a")
    if not files._renameat2(tmp_path / "a", tmp_path / "b", files._RENAME_NOREPLACE):
        pytest.skip("renameat2 is not available here")
    (tmp_path / "b").unlink()
    target, summary = tmp_path / "g", tmp_path / "s.json"
    if was_there:
        _guardrail_folder(target, "this run's earlier result")
        summary.write_text('{"from": "an earlier run"}')
    check_output_dir(target, "guardrail", overwrite=True)
    check_output_file(summary, overwrite=True)

    def theirs_dir():  # published as this module publishes: a new folder renamed over the path
        _guardrail_folder(tmp_path / "theirs", "the other process's result")
        os.rename(tmp_path / "theirs", target) if not was_there else files._exchange(tmp_path / "theirs", target)

    _lands_after_the_check(monkeypatch, theirs_dir)
    with pytest.raises(dsg.DSGError, match="written by another process"), atomic_directory(target, "guardrail") as tmp:
        _guardrail_folder(tmp, "this process's result")
    assert (target / "guardrail.safetensors").read_text() == "the other process's result"
    assert {p.name for p in tmp_path.iterdir()} <= {"g", "s.json", "theirs"}  # no staging folder left

    _lands_after_the_check(monkeypatch, lambda: summary.write_text('{"from": "the other process"}'))
    with pytest.raises(dsg.DSGError, match="written by another process"):
        write_text_atomic(summary, '{"from": "this one"}')
    assert "the other process" in summary.read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_folder_held_by_one_compare_is_refused_to_another(tmp_path):
    from dsg.files import exclusive

    out = tmp_path / "cmp"
    with exclusive(out, "dsg compare"):
        (out / "compare.json").write_text("{}")
        with pytest.raises(dsg.DSGError, match="Another dsg compare is writing"), exclusive(out, "dsg compare"):
            pass
    with exclusive(out, "dsg compare"):  # free again once the first is done
        pass
    with exclusive(tmp_path / "never", "dsg compare"):
        pass
    assert not (tmp_path / "never").exists()  # a folder it made and left empty is removed


def test_a_second_demo_on_the_same_folder_is_refused_at_once_and_a_failed_one_leaves_nothing(tmp_path):
    """Two demos writing one --out used to both run to their end (half an hour each) before the second found the
    folder replaced; the second is now refused before it loads anything. A demo refused early leaves no folder."""
    from dsg.bench import demo
    from dsg.files import exclusive

    out = tmp_path / "d"
    with exclusive(out, "dsg demo"), pytest.raises(dsg.DSGError, match="Another dsg demo is writing"):
        demo.run_demo(demo.DemoConfig(out=str(out)))
    assert not out.exists()
    with pytest.raises(dsg.DSGError, match="also --general"):
        demo.run_demo(demo.DemoConfig(forget="cyber", general="cyber", out=str(out)))
    assert not out.exists()
