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


def test_a_file_written_between_the_check_and_the_move_into_an_empty_place_is_not_replaced(tmp_path, monkeypatch):
    """Another program's file that lands at an empty output path after the claim check: the move (renameat2
    RENAME_NOREPLACE) refuses to replace it."""
    (tmp_path / "a").write_text("a")
    if not files._renameat2(tmp_path / "a", tmp_path / "b", files._RENAME_NOREPLACE):
        pytest.skip("renameat2 is not available here")
    (tmp_path / "b").unlink()
    target = tmp_path / "g"
    check_output_dir(target, "guardrail")

    def check_then_lose_the_race(path):
        _CHECK_CLAIM(path)
        _guardrail_folder(target, "the other program's")

    monkeypatch.setattr(files, "_check_claim", check_then_lose_the_race)
    with pytest.raises(dsg.DSGError, match="written by another process"), atomic_directory(target, "guardrail") as tmp:
        _guardrail_folder(tmp, "this process's result")
    assert (target / "guardrail.safetensors").read_text() == "the other program's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # no staging folder left


def _racer(path, kind, who, barrier, results):
    """One command of a race: claim the output, wait for the others, build, wait again, publish."""
    from dsg.files import check_output_file, write_text_atomic

    try:
        if kind == "folder":
            check_output_dir(path, "guardrail", overwrite=True)
            barrier.wait()
            with atomic_directory(path, "guardrail") as tmp:
                _guardrail_folder(tmp, who)
                barrier.wait()
        else:
            check_output_file(path, overwrite=True, keys=("who",))
            barrier.wait()
            barrier.wait()
            write_text_atomic(path, f'{{"who": "{who}"}}')
        results.put((who, "won"))
    except dsg.DSGError:
        results.put((who, "refused"))
    except BaseException as e:  # anything else is a defect: report it rather than hang the others
        results.put((who, f"{type(e).__name__}: {e}"))


@pytest.mark.parametrize("racers", [2, 3])
@pytest.mark.parametrize("kind", ["folder", "file"])
@pytest.mark.parametrize("was_there", [False, True], ids=["new", "overwrite"])
def test_of_several_commands_given_one_output_at_once_exactly_one_wins(tmp_path, racers, kind, was_there):
    """Processes that each claimed the same output publish at the same moment: one reports success and its result
    is the one at the path; every other one is refused, and nothing half-written or staged is left."""
    import json
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for round_ in range(8):
        root = tmp_path / str(round_)
        root.mkdir()
        path = root / ("g" if kind == "folder" else "s.json")
        if was_there and kind == "folder":
            _guardrail_folder(path, "earlier")
        elif was_there:
            path.write_text('{"who": "earlier"}')
        barrier, results = context.Barrier(racers), context.Queue()
        procs = [context.Process(target=_racer, args=(path, kind, f"p{i}", barrier, results)) for i in range(racers)]
        for p in procs:
            p.start()
        outcomes = dict(results.get(timeout=60) for _ in procs)
        for p in procs:
            p.join()
        winners = [who for who, what in outcomes.items() if what == "won"]
        assert len(winners) == 1 and set(outcomes.values()) == {"won", "refused"}, outcomes
        if kind == "folder":
            assert (path / "guardrail.safetensors").read_text() == winners[0]
        else:
            assert json.loads(path.read_text())["who"] == winners[0]
        assert sorted(p.name for p in root.iterdir()) == [path.name]


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


def test_a_publish_lock_folder_that_is_not_private_is_not_trusted(tmp_path, monkeypatch):
    """Another user may make the lock folder first (its name is public): a folder that is not this user's own and
    private, or a lock file that is a symbolic link, is not used (the claim then holds to the check before the
    move), rather than letting that user hold the lock or have files made in this user's name."""
    monkeypatch.setattr(files.tempfile, "tempdir", str(tmp_path))
    folder = tmp_path / f"dsg-publish-{os.getuid()}"
    assert files._lock_file(tmp_path / "g") is not None  # made private: used
    os.chmod(folder, 0o755)
    assert files._lock_file(tmp_path / "g") is None
    os.chmod(folder, 0o700)
    lock = next(folder.iterdir())
    lock.unlink()
    lock.symlink_to(tmp_path / "elsewhere")
    assert files._lock_file(tmp_path / "g") is None and not (tmp_path / "elsewhere").exists()
    with atomic_directory(tmp_path / "g", "guardrail") as tmp:  # publishing still works without the lock
        _guardrail_folder(tmp, "new")
    assert (tmp_path / "g" / "guardrail.safetensors").read_text() == "new"


def test_a_tensor_file_the_machine_cannot_write_is_an_os_error_naming_it(tmp_path):
    """safetensors raises its own error type for a failed write, with the OS error only as text, which reached the
    user as a traceback: saving a guardrail past a file-size limit (as on a full disk) is an OSError naming the file,
    which every command reports in one line, and leaves no folder."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        import dsg
        from tiny import tiny_sae
        guard = dsg.Guardrail(tiny_sae(d_in=512, d_sae=256), features=[1, 2])
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            guard.save({str(tmp_path / "g")!r})
        except OSError as e:
            print(e.errno, e.strerror, e.filename, sep="|")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    number, reason, filename = out.stdout.strip().split("|")
    assert int(number) == 27 and reason == "File too large" and filename.endswith(".safetensors"), out.stdout
    assert os.listdir(tmp_path) == []


def test_a_replaced_folder_the_user_made_read_only_is_deleted_or_named(tmp_path, monkeypatch, capsys):
    """`--overwrite` of a guardrail folder made read-only (chmod 555) left the old one behind as a hidden folder,
    without a word (its removal ignored errors). Its folders are made writable and it goes on a second try; what
    cannot go is named on stderr."""
    old = tmp_path / ".g.old"
    (old / "sae").mkdir(parents=True)
    (old / "sae" / "cfg.json").write_text("{}")
    real, calls = files.shutil.rmtree, []

    def refuses_while_read_only(path, *args, **kwargs):  # what a non-root user meets (root may delete anyway)
        calls.append(os.stat(path).st_mode & 0o777)
        if calls[-1] & 0o200 == 0:
            raise PermissionError(13, "Permission denied", str(path / "sae"))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(files.shutil, "rmtree", refuses_while_read_only)
    os.chmod(old / "sae", 0o555)
    os.chmod(old, 0o555)
    files.remove_tree(old)
    assert not old.exists() and len(calls) == 2 and capsys.readouterr().err == ""

    old.mkdir()
    monkeypatch.setattr(files.shutil, "rmtree", lambda path, *a, **k: (_ for _ in ()).throw(OSError(16, "Busy")))
    files.remove_tree(old)
    err = capsys.readouterr().err
    assert old.exists() and f"could not delete the replaced output at {str(old)!r} (Busy); delete it yourself" in err


def test_an_output_named_like_the_embedded_model_is_not_taken_for_it(tmp_path, monkeypatch):
    """--model smollm2-135m-instruct is read from the package, never from a folder of that name: an output named
    after it (an SAE named after its model) was refused as 'would replace the input'."""
    from dsg.cli import model_input

    monkeypatch.chdir(tmp_path)
    assert model_input("smollm2-135m-instruct") is None and model_input(" SmolLM2-135M ") is None
    assert model_input("models/mine") == "models/mine"
    check_output_dir("smollm2-135m-instruct", "SAE", inputs=[model_input("smollm2-135m-instruct")])
    files.check_output_file("smollm2-135m-instruct.json", inputs=[model_input("smollm2-135m-instruct")])
    (tmp_path / "mine").mkdir()
    with pytest.raises(dsg.DSGError, match="would replace the input 'mine'"):
        check_output_dir("mine", "SAE", inputs=[model_input("mine")])


def test_a_summary_the_machine_cannot_write_names_its_file(tmp_path, monkeypatch):
    """A failed write of `dsg eval --out` said only 'File too large.'; the error names the output."""
    real = os.fdopen

    class Full:
        def __init__(self, fd, *a, **k):
            self.f = real(fd, *a, **k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            raise OSError(27, "File too large")

    monkeypatch.setattr(files.os, "fdopen", Full)
    with pytest.raises(OSError) as info:
        files.write_text_atomic(tmp_path / "e.json", "{}")
    assert info.value.filename == str(tmp_path / "e.json") and info.value.strerror == "File too large"
    assert os.listdir(tmp_path) == []


def test_writers_that_add_to_a_folder_may_write_into_the_working_folder(tmp_path, monkeypatch):
    """Only an output published whole, by a rename onto its path, cannot be the working folder: `dsg data export
    --out .` adds its domain folders there, and a comparison resumed from inside its own folder adds to it."""
    from dsg.data.domains import export

    monkeypatch.chdir(tmp_path)
    assert check_output_dir(".", "comparison", resume=True) == files.Path(".")
    written = export(["chemistry"], ".")
    assert written and (tmp_path / "chemistry" / "test_questions.jsonl").is_file()
    for refused in (lambda: check_output_dir(".", "SAE"), lambda: atomic_directory(".", "guardrail").__enter__()):
        with pytest.raises(dsg.DSGError, match="is the working folder or one above it"):
            refused()


def test_a_folder_under_a_file_is_refused_naming_the_file(tmp_path):
    """Saving under a path whose parent is a file said only "File exists"."""
    (tmp_path / "notes.txt").write_text("mine")
    for target in (tmp_path / "notes.txt" / "g", tmp_path / "notes.txt" / "a" / "g"):
        with pytest.raises(dsg.DSGError, match=f"{str(tmp_path / 'notes.txt')!r} is a file, not a folder"):
            atomic_directory(target, "guardrail").__enter__()
    assert (tmp_path / "notes.txt").read_text() == "mine" and os.listdir(tmp_path) == ["notes.txt"]
