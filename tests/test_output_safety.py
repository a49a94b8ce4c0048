"""Data safety (issue 10, items 1-4): loramix never deletes what it did not create, a failed bank
build leaves the bank as it was, files follow the umask, and staging folders of dead processes
are cleaned by the next run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import _tiny
from loramix.bank.bank import Bank, BankError, build_bank
from loramix.core import files
from loramix.mixing.output import swap_in
from loramix.pipeline import OutputError, generate, mix_adapters
from loramix.profiles.tokens import ProfileError


def _tree(root: Path) -> dict:
    """Every file under ``root`` (links not followed) → its bytes: what must survive untouched."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else "dir")
            for p in sorted(root.rglob("*"))}


def _one_line_error(r, *words):
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("loramix: error: "), r.stderr
    for wd in words:
        assert wd in last, last


# ---------------------------------------------------------------- 1. --overwrite replaces only loramix's own

def test_overwrite_refuses_a_users_folder(w, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.txt").write_text("four years of work")
    (user / "notes").mkdir()
    (user / "notes" / "a.md").write_text("x")
    before = _tree(user)
    with pytest.raises(OutputError, match="not a loramix output"):
        generate(w.queries["animals_q"], w.bank, user, overwrite=True)
    assert _tree(user) == before
    r = _tiny.run_cli("generate", w.queries["animals_q"], "--bank", w.bank, "-o", user, "--overwrite")
    _one_line_error(r, "not replaced", "thesis.txt")
    assert _tree(user) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_refuses_the_current_folder_and_its_ancestors(w, tmp_path):
    cwd = tmp_path / "work" / "here"
    cwd.mkdir(parents=True)
    (cwd / "keep.txt").write_text("keep")
    before = _tree(tmp_path)
    for out in (".", "..", str(cwd)):
        r = _tiny.run_cli("generate", w.queries["animals_q"], "--bank", w.bank, "-o", out, "--overwrite",
                          cwd=cwd)
        _one_line_error(r, "not replaced", "current folder")
    assert _tree(tmp_path) == before
    # even an empty current folder, and even a previous loramix output one has cd'ed into
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _tiny.run_cli("generate", w.queries["animals_q"], "--bank", w.bank, "-o", ".", "--overwrite", cwd=empty)
    _one_line_error(r, "current folder")
    assert empty.is_dir()
    prev = tmp_path / "prev"
    generate(w.queries["animals_q"], w.bank, prev)
    r = _tiny.run_cli("generate", w.queries["music_q"], "--bank", w.bank, "-o", ".", "--overwrite", cwd=prev)
    _one_line_error(r, "current folder")
    assert (prev / "adapter_model.safetensors").is_file()


def test_overwrite_refuses_the_dataset_folder_and_the_bank(w, tmp_path):
    data = tmp_path / "data"
    ds = data / "q.jsonl"
    data.mkdir()
    shutil.copyfile(w.queries["animals_q"], ds)
    before = _tree(data)
    with pytest.raises(OutputError, match="holds .*q.jsonl, an input of this run"):
        generate(ds, w.bank, data, overwrite=True)
    assert _tree(data) == before
    # the bank itself, one of its ancestors, a member folder, through a symbolic link too
    bank = tmp_path / "bank"
    shutil.copytree(w.bank, bank)
    link = tmp_path / "banklink"
    link.symlink_to(bank)
    bank_before = _tree(bank)
    for out in (bank, tmp_path, bank / "m0", link, link / "m1"):
        with pytest.raises(OutputError, match="bank|current folder|symbolic link|input"):
            generate(ds, bank, out, overwrite=True)
    assert _tree(bank) == bank_before


def test_overwrite_refuses_a_loramix_output_holding_other_files(w, tmp_path):
    out = tmp_path / "o"
    generate(w.queries["animals_q"], w.bank, out)
    (out / "my_eval.csv").write_text("score\n0.5\n")
    weights = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputError, match="did not write there: my_eval.csv"):
        generate(w.queries["music_q"], w.bank, out, overwrite=True)
    assert (out / "my_eval.csv").read_text() == "score\n0.5\n"
    assert (out / "adapter_model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("prov", ["{}", "[1, 2]", "not json", '{"loramix_version": "0.1", "mode": "x"}'])
def test_overwrite_checks_the_provenance_format(w, tmp_path, prov):
    out = tmp_path / "o"
    out.mkdir()
    (out / "loramix.json").write_text(prov)
    (out / "adapter_model.safetensors").write_bytes(b"precious")
    with pytest.raises(OutputError, match="loramix.json"):
        generate(w.queries["animals_q"], w.bank, out, overwrite=True)
    assert (out / "adapter_model.safetensors").read_bytes() == b"precious"


def test_overwrite_refuses_a_symbolic_link(w, tmp_path):
    real = tmp_path / "real"
    generate(w.queries["animals_q"], w.bank, real)
    link = tmp_path / "link"
    link.symlink_to(real)
    before = _tree(real)
    with pytest.raises(OutputError, match="symbolic link"):
        generate(w.queries["music_q"], w.bank, link, overwrite=True)
    assert link.is_symlink() and _tree(real) == before


def test_overwrite_replaces_an_empty_folder_and_a_previous_output(w, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    generate(w.queries["animals_q"], w.bank, empty, overwrite=True)
    assert (empty / "adapter_model.safetensors").is_file()
    r = _tiny.run_cli("explain", empty)             # explain's chart is loramix's own file
    assert r.returncode == 0, r.stderr
    first = (empty / "adapter_model.safetensors").read_bytes()
    res = generate(w.queries["music_q"], w.bank, empty, overwrite=True)
    assert (empty / "adapter_model.safetensors").read_bytes() != first
    assert sorted(p.name for p in empty.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "loramix.json", "README.md"])
    assert res.out == empty
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_mix_adapters_api_and_swap_in_refuse_a_users_folder(w, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.txt").write_text("x")
    with pytest.raises(OutputError, match="not a loramix output"):
        mix_adapters(w.bank, np.array([0.25, 0.25, 0.25, 0.25]), [user], overwrite=True)
    assert (user / "thesis.txt").read_text() == "x"
    # the last check, right before the swap: the folder changed after generate() looked at it
    stage = files.make_stage_dir(tmp_path, "mine")
    (stage / "loramix.json").write_text("{}")
    with pytest.raises(OutputError, match="not replaced"):
        swap_in(stage, user)
    assert (user / "thesis.txt").read_text() == "x" and stage.is_dir()


def test_many_datasets_into_an_existing_folder_replace_only_their_own(w, tmp_path):
    out = tmp_path / "many"
    out.mkdir()
    (out / "animals_q").mkdir()
    (out / "animals_q" / "mine.txt").write_text("mine")
    (out / "other.txt").write_text("other")
    qs = [w.queries["animals_q"], w.queries["music_q"]]
    with pytest.raises(OutputError, match="animals_q not replaced"):
        generate(qs, w.bank, out, overwrite=True)
    shutil.rmtree(out / "animals_q")
    generate(qs, w.bank, out)
    generate(qs, w.bank, out, overwrite=True)       # its own previous outputs: replaced
    assert (out / "other.txt").read_text() == "other"
    assert sorted(p.name for p in out.iterdir()) == ["animals_q", "music_q", "other.txt"]


# ---------------------------------------------------------------- 2. a failed bank build changes nothing

def _bank_copy(w, tmp_path) -> Path:
    bank = tmp_path / "bank"
    shutil.copytree(w.bank, bank)
    return bank


def test_failed_build_with_a_non_tokenizer_file_leaves_the_bank(w, tmp_path):
    bank = _bank_copy(w, tmp_path)
    cfg = tmp_path / "base" / "tokenizer_config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"model_max_length": 32768, "tokenizer_class": "LlamaTokenizer"}))
    before = _tree(bank)
    with pytest.raises(ProfileError, match="tokenizer_config.json: not a tokenizer.json the `tokenizers` library can load"):
        build_bank(bank, cfg)
    assert _tree(bank) == before
    r = _tiny.run_cli("bank", "build", bank, "--tokenizer", cfg)
    _one_line_error(r, "tokenizer_config.json", "not a tokenizer.json")
    assert _tree(bank) == before
    res = generate(w.queries["animals_q"], bank, tmp_path / "out")     # the bank still works
    assert np.isclose(res.weights.sum(), 1)


def test_failed_build_after_new_profiles_leaves_the_bank(w, tmp_path):
    """Another tokenizer (every profile is rebuilt) and one broken member: the build fails after
    re-tokenizing the good members, and neither their profiles nor the tokenizer changed."""
    bank = _bank_copy(w, tmp_path)
    tok2 = _tiny.build_tokenizer(tmp_path / "tok2")
    j = json.loads(tok2.read_text())
    j["model"]["vocab"]["zzz"] = len(j["model"]["vocab"])
    tok2.write_text(json.dumps(j))
    (bank / "m3" / "adapter_config.json").write_text("{not json")
    before = _tree(bank)
    with pytest.raises(BankError, match="'m3'"):
        build_bank(bank, tok2)
    assert _tree(bank) == before
    # fixed: the build goes through and swaps everything in
    shutil.copyfile(w.bank / "m3" / "adapter_config.json", bank / "m3" / "adapter_config.json")
    doc = build_bank(bank, tok2)
    assert (bank / "tokenizer.json").read_bytes() == tok2.read_bytes()
    assert Bank.open(bank).hash == doc["bank_hash"]
    assert [p.name for p in bank.rglob(".*")] == []


def test_rebuild_of_an_unchanged_bank_is_byte_identical(w, tmp_path):
    bank = _bank_copy(w, tmp_path)
    before = _tree(bank)
    build_bank(bank, w.tokenizer)
    assert _tree(bank) == before


# ---------------------------------------------------------------- 3. permissions follow the umask

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_and_folders_follow_the_umask(w, tmp_path, umask):
    old = os.umask(umask)
    try:
        bank = tmp_path / "bank"
        shutil.copytree(w.bank, bank)
        for p in bank.rglob("profile.npz"):
            p.unlink()
        (bank / "tokenizer.json").unlink()
        build_bank(bank, w.tokenizer)
        out = tmp_path / "o"
        generate(w.queries["animals_q"], bank, out)
        generate(w.queries["music_q"], bank, out, overwrite=True)
        many = tmp_path / "new" / "many"
        generate([w.queries["animals_q"], w.queries["music_q"]], bank, many)
    finally:
        os.umask(old)
    fmode, dmode = 0o666 & ~umask, 0o777 & ~umask
    made = [bank / "bank.json", bank / "tokenizer.json", *bank.rglob("profile.npz"),
            *out.iterdir(), *many.rglob("*")]
    for p in made + [out, many, many.parent]:
        want = dmode if p.is_dir() else fmode
        assert stat.S_IMODE(p.stat().st_mode) == want, f"{p}: {oct(stat.S_IMODE(p.stat().st_mode))} != {oct(want)}"


# ---------------------------------------------------------------- 4. no staging folders left behind

_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from loramix.mixing import modes
    real = modes.mix_to_files
    def killed(*a, **k):   # the staging folder exists now: die as under SIGKILL, no cleanup
        os.kill(os.getpid(), signal.SIGKILL)
    modes.mix_to_files = killed
    from loramix.pipeline import generate
    generate(sys.argv[1], sys.argv[2], sys.argv[3])
""")


def _killed_generate(w, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(_tiny.PKG_PARENT), str(_tiny.ROOT / "tests")]))
    return subprocess.run([sys.executable, "-c", _KILLED_RUN, str(w.queries["animals_q"]), str(w.bank), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)


def _stages(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


def test_staging_folders_of_killed_runs_are_cleaned_by_the_next_run(w, tmp_path):
    out = tmp_path / "o"
    for _ in range(3):   # each killed run already cleans what the one before it left
        r = _killed_generate(w, out)
        assert r.returncode == -signal.SIGKILL, r.stderr
        assert len(_stages(tmp_path)) == 1 and not out.exists()
    generate(w.queries["animals_q"], w.bank, out)
    assert _stages(tmp_path) == [] and (out / "adapter_model.safetensors").is_file()
    # a killed run for another output in the same folder is cleaned too
    assert _killed_generate(w, tmp_path / "other").returncode == -signal.SIGKILL
    generate(w.queries["music_q"], w.bank, out, overwrite=True)
    assert _stages(tmp_path) == []


def test_staging_folders_of_live_processes_and_other_hosts_are_kept(w, tmp_path):
    code = ("import sys; from loramix.core.files import make_stage_dir; "
            "print(make_stage_dir(sys.argv[1], 'o'), flush=True); sys.stdin.read()")
    env = dict(os.environ, PYTHONPATH=str(_tiny.PKG_PARENT))
    with subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=env) as live:
        stage = Path(live.stdout.readline().strip())
        assert stage.is_dir() and f".o.tmp-{live.pid}-" in stage.name
        other_host = tmp_path / ".o.tmp-1-00000000abcdef-k3j4h5g6"      # another machine's PID 1
        other_host.mkdir()
        user = tmp_path / ".o.tmp-notes"                                   # not loramix's pattern
        user.mkdir()
        generate(w.queries["animals_q"], w.bank, tmp_path / "o")
        assert stage.is_dir() and other_host.is_dir() and user.is_dir()
        live.stdin.close()
        live.wait(timeout=60)
    assert files.clean_stale_stages(tmp_path) == [stage]   # its owner is gone now
    assert other_host.is_dir() and user.is_dir()


def test_owner_less_staging_folders_go_only_when_old_and_loramix_made(w, tmp_path):
    old_stage = tmp_path / ".o.tmp-a1b2c3d4"            # the name older loramix versions used
    old_stage.mkdir()
    (old_stage / "adapter_model.safetensors").write_bytes(b"x")
    (old_stage / ".adapter_model.safetensors.tmp-zz").write_bytes(b"x")
    recent = tmp_path / ".p.tmp-e5f6g7h8"
    recent.mkdir()
    (recent / "loramix.json").write_text("{}")
    foreign = tmp_path / ".q.tmp-i9j0k1l2"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("x")
    past = time.time() - files.STAGE_LEGACY_AGE_S - 60
    for d in (old_stage, foreign):
        for p in [*d.iterdir(), d]:
            os.utime(p, (past, past))
    assert files.clean_stale_stages(tmp_path) == [old_stage]
    assert recent.is_dir() and (foreign / "thesis.txt").is_file()


def test_failed_runs_leave_no_empty_output_folder(w, tmp_path, monkeypatch):
    from loramix.mixing import modes

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(modes, "mix_to_files", boom)
    qs = [w.queries["animals_q"], w.queries["music_q"]]
    with pytest.raises(RuntimeError, match="disk full"):
        generate(qs, w.bank, tmp_path / "new" / "many")
    with pytest.raises(RuntimeError, match="disk full"):
        generate(qs[0], w.bank, tmp_path / "deep" / "er" / "one")
    with pytest.raises(RuntimeError, match="disk full"):
        mix_adapters(w.bank, np.array([0.25] * 4), [tmp_path / "api" / "x"])
    assert list(tmp_path.iterdir()) == []
    # a folder that already existed stays, with what it held
    keep = tmp_path / "keep"
    keep.mkdir()
    with pytest.raises(RuntimeError, match="disk full"):
        generate(qs, w.bank, keep)
    assert keep.is_dir() and list(keep.iterdir()) == []


def test_minibank_force_replaces_only_a_previous_mini_bank(tmp_path, monkeypatch):
    from loramix.minibank.build import MANIFEST, build

    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.txt").write_text("x")
    with pytest.raises(FileExistsError, match=f"no mini bank \\(no {MANIFEST}\\)"):
        build("default", user, scale="tiny", force=True)
    assert (user / "thesis.txt").read_text() == "x"
    (user / MANIFEST).write_text("{}")            # a mini bank, but the current folder
    monkeypatch.chdir(user)
    with pytest.raises(FileExistsError, match="current folder"):
        build("default", ".", scale="tiny", force=True)
    assert (user / "thesis.txt").read_text() == "x"


def test_profile_and_chart_outputs_never_replace_a_users_file(w, tmp_path):
    thesis = tmp_path / "thesis.txt"
    thesis.write_text("four years of work")
    r = _tiny.run_cli("profile", w.queries["music_q"], "--bank", w.bank, "-o", thesis)
    _one_line_error(r, "thesis.txt", "not a loramix profile")
    npz = tmp_path / "music.npz"
    for _ in range(2):   # a profile replaces a profile
        r = _tiny.run_cli("profile", w.queries["music_q"], "--bank", w.bank, "-o", npz)
        assert r.returncode == 0, r.stderr
    out = tmp_path / "o"
    generate(w.queries["animals_q"], w.bank, out)
    r = _tiny.run_cli("explain", out, "--png", thesis)
    _one_line_error(r, "thesis.txt", "not an image file")
    assert thesis.read_text() == "four years of work"
    png = tmp_path / "chart.png"
    for _ in range(2):   # a chart replaces a chart
        r = _tiny.run_cli("explain", out, "--png", png)
        assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


_KILLED_BUILD = textwrap.dedent("""
    import os, signal, sys
    from loramix.core import files
    def killed(self):   # everything is staged: die before the renames, as under SIGKILL
        os.kill(os.getpid(), signal.SIGKILL)
    files.StagedFiles.commit = killed
    from loramix.bank.bank import build_bank
    build_bank(sys.argv[1], sys.argv[2])
""")


def test_temporary_files_of_a_killed_build_are_cleaned_and_the_bank_kept(w, tmp_path):
    bank = _bank_copy(w, tmp_path)
    tok2 = _tiny.build_tokenizer(tmp_path / "tok2")     # same vocabulary, other bytes: all staged anew
    tok2.write_text(tok2.read_text() + "\n")
    before = _tree(bank)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(_tiny.PKG_PARENT), str(_tiny.ROOT / "tests")]))
    r = subprocess.run([sys.executable, "-c", _KILLED_BUILD, str(bank), str(tok2)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = sorted(str(p.relative_to(bank)) for p in bank.rglob(".*.tmp"))
    assert len(left) == 2 + 4, left          # tokenizer.json, bank.json, 4 profiles
    assert {k: v for k, v in _tree(bank).items() if k not in left} == before
    res = generate(w.queries["animals_q"], bank, tmp_path / "o")        # the old bank still works
    assert np.isclose(res.weights.sum(), 1)
    build_bank(bank, w.tokenizer)
    assert list(bank.rglob(".*")) == [] and _tree(bank) == before


def test_dask_batches_replace_only_loramix_outputs(w, tmp_path):
    from dask.distributed import Client, LocalCluster

    qs = [w.queries["animals_q"], w.queries["music_q"]]
    out = tmp_path / "many"
    cluster = LocalCluster(n_workers=1, processes=True, threads_per_worker=1, host="127.0.0.1",
                           dashboard_address=None,
                           scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"})
    try:
        with Client(cluster, set_as_default=False) as c:
            generate(qs, w.bank, out, client=c)
            (out / "music_q" / "notes.txt").write_text("mine")      # a finished output, with a user's file
            res = generate(qs, w.bank, out, client=c)              # skipped, not replaced: fine
            assert [r.status for r in res] == ["skipped", "skipped"]
            (out / "animals_q" / "adapter_model.safetensors").write_bytes(b"damaged")
            user = out / "animals_q"
            (user / "thesis.txt").write_text("x")
            with pytest.raises(OutputError, match="animals_q not replaced: .*thesis.txt"):
                generate(qs, w.bank, out, client=c, overwrite=True)
            assert (user / "thesis.txt").read_text() == "x" and (out / "music_q" / "notes.txt").is_file()
            from loramix.mixing import distributed   # the API below generate(): refused at the swap
            with pytest.raises(OutputError, match="not replaced: .*thesis.txt"):
                distributed.mix_adapters(w.bank, np.array([0.25] * 4), [user], client=c, overwrite=True)
            assert (user / "thesis.txt").read_text() == "x"
            assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    finally:
        cluster.close()


def test_leftovers_of_a_previous_boot_go_and_other_pid_namespaces_stay(tmp_path):
    mine = files.make_stage_dir(tmp_path, "mine")                  # .mine.tmp-PID-TAG-XXXXXXXX
    pid, tag = mine.name.split(".tmp-")[1].split("-")[:2]
    assert pid == str(os.getpid()) and len(tag) == 14
    boot = "000000" if tag[8:] != "000000" else "111111"
    old_boot = tmp_path / f".o.tmp-{os.getpid()}-{tag[:8]}{boot}-abcdefgh"   # even a live PID's number
    old_boot.mkdir()
    old_file = tmp_path / f".bank.json.tmp-{os.getpid()}-{tag[:8]}{boot}-abcdefgh.tmp"
    old_file.write_text("{}")
    other_ns = tmp_path / f".o.tmp-999999-{'0' if tag[0] != '0' else '1'}{tag[1:]}-abcdefgh"
    other_ns.mkdir()
    assert sorted(files.clean_stale_stages(tmp_path)) == sorted([old_boot, old_file])
    assert mine.is_dir() and other_ns.is_dir()


def test_bank_pull_replaces_only_a_dataset_folder_it_placed(w, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from loramix.bank import hub
    from test_generate import _fake_hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repos = _fake_hub(tmp_path / "hf", w)
    kw = dict(datasets=["Lots-of-LoRAs/task001_food_generation"], cache_dir=tmp_path / "hf" / "hub")
    hub.pull(repos[:1], tmp_path / "bank", **kw)
    hub.pull(repos[:1], tmp_path / "bank", **kw)          # a previous pull's folder: replaced
    data = tmp_path / "bank" / "Mistral-tiny-r4-task000" / "dataset"
    mine = data / "my_extra_examples.jsonl"
    mine.write_text('{"input": "a", "output": ["b"]}\n')
    with pytest.raises(hub.HubError, match="my_extra_examples.jsonl"):
        hub.pull(repos[:1], tmp_path / "bank", **kw)
    assert mine.is_file() and (data / "data" / "train-00000-of-00001.parquet").is_file()


def test_eval_results_folder_of_someone_else_is_not_written_into(tmp_path):
    from loramix.evaluation import loo

    cfg = {k: None for k in loo.RESULT_KEYS}
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "results.csv").write_text("their,numbers\n")
    with pytest.raises(ValueError, match="holds results.csv but no run.json"):
        loo._check_run(theirs, cfg)
    assert (theirs / "results.csv").read_text() == "their,numbers\n" and not (theirs / "run.json").exists()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "notes.txt").write_text("x")          # other files: the run only adds its own
    loo._check_run(fresh, cfg)
    loo._check_run(fresh, cfg)                     # a resumed run
    assert (fresh / "run.json").is_file()


def test_the_nonfinite_check_of_an_output_releases_each_tensor_it_read(w, tmp_path, monkeypatch):
    """The staged output is scanned for NaN/inf before it is swapped in; an output as large as the
    bank (concat of every member) must not stay mapped in the process (it held all of it: VmHWM
    1.3 GB for a 1.2 GB output): every tensor's pages are released once scanned. And a NaN is
    still found."""
    from safetensors.numpy import load_file, save_file

    from loramix.core import tensors
    from loramix.mixing import guard

    res = mix_adapters(w.bank, {"m0": 0.5, "m1": 0.5}, tmp_path / "o", mode="concat")[0]
    path = res.out / "adapter_model.safetensors"
    released = []
    real = tensors.release_pages
    monkeypatch.setattr(tensors, "release_pages", lambda refs: released.extend(refs) or real(refs))
    assert guard.nonfinite_tensor(path) is None
    keys = tensors.SafetensorsFile(str(path)).keys()
    assert len(released) == len(keys) and all(isinstance(r, tensors.TensorRef) for r in released)
    t = load_file(str(path))
    k = sorted(t)[3]
    t[k] = t[k].copy()
    t[k].reshape(-1)[5] = np.nan
    save_file(t, str(tmp_path / "bad.safetensors"))
    assert guard.nonfinite_tensor(tmp_path / "bad.safetensors") == (k, 5)


# ---------------------------------------------------------------- 5. outputs finished side by side

@pytest.mark.parametrize("threads", ["1", "3"])
def test_a_batch_finished_in_threads_is_sealed_as_seal_writes_it(w, tmp_path, monkeypatch, threads):
    """The Q outputs are committed, hashed and finished in threads, the provenance sealed in its
    first write: the same bytes as one thread, and as ``seal`` on the unsealed document; the
    checksums are the files'."""
    from loramix.bank.integrity import file_sha256
    from loramix.mixing.output import PROVENANCE_NAME, seal

    qs = [w.queries["animals_q"], w.queries["music_q"], w.queries["animals_q"]]
    monkeypatch.setenv("LORAMIX_NUM_THREADS", "1")
    ref = generate(qs, w.bank, tmp_path / "ref", top_k=3)
    monkeypatch.setenv("LORAMIX_NUM_THREADS", threads)
    res = generate(qs, w.bank, tmp_path / "out", top_k=3)
    assert len({r.out.name for r in res}) == 3
    for a, b in zip(ref, res):
        assert _tree(a.out) == _tree(b.out)
        prov = json.loads((b.out / PROVENANCE_NAME).read_text())
        assert prov["batch"]["weights_sha256"] == file_sha256(b.out / "adapter_model.safetensors")
        assert prov["batch"]["config_sha256"] == file_sha256(b.out / "adapter_config.json")
        stage = tmp_path / f"stage-{b.out.name}"
        shutil.copytree(b.out, stage)
        batch = prov.pop("batch")
        (stage / PROVENANCE_NAME).write_text(json.dumps(prov, indent=1) + "\n")
        assert seal(stage, batch["target_key"], batch["split"]) == batch["weights_sha256"]
        assert (stage / PROVENANCE_NAME).read_bytes() == (b.out / PROVENANCE_NAME).read_bytes()


def test_commit_all_commits_every_writer_and_raises_the_first_error(tmp_path):
    """Concurrent commits with checksums: each file's SHA-256 is its bytes'; a writer that cannot
    commit (a tensor not written) raises once every commit has returned, the others committed."""
    from loramix.bank.integrity import file_sha256
    from loramix.core import tensors
    from loramix.mixing.modes import MixInfo, commit_all

    def writer(i, complete=True):
        wr = tensors.SafetensorsWriter(tmp_path / f"{i}.safetensors", [("a", "F32", (3, 5)), ("b", "F32", (4,))])
        wr.write("a", np.full((3, 5), i, np.float32))
        if complete:
            wr.write("b", np.arange(4, dtype=np.float32) * i)
        return wr

    ws = [writer(i) for i in range(5)]
    infos = [MixInfo() for _ in ws]
    commit_all(ws, infos)
    assert [inf.sha256 for inf in infos] == [file_sha256(tmp_path / f"{i}.safetensors") for i in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i}.safetensors" for i in range(5)]
    ws = [writer(i) for i in range(10, 14)]
    ws[1] = writer(11, complete=False)
    ws[2] = writer(12, complete=False)
    with pytest.raises(ValueError, match=r"cannot commit .*11\.safetensors.*not written"):
        commit_all(ws, [MixInfo() for _ in ws])
    assert (tmp_path / "10.safetensors").is_file() and (tmp_path / "13.safetensors").is_file()
    for wr in ws:
        wr.abort()
    assert not [p for p in tmp_path.iterdir() if ".tmp." in p.name]


def test_outputs_hashed_behind_the_writer_module_by_module(tmp_path):
    """HashBehind follows writers that write module by module in file order: its checksums are
    the finished files' and its NaN/inf verdicts the files' own; commit_all takes them (or hashes
    afresh an output it could not follow), and close() stops it mid-way."""
    from loramix.bank.integrity import file_sha256
    from loramix.core import tensors
    from loramix.mixing.digests import HashBehind
    from loramix.mixing.modes import MixInfo, commit_all

    mods = ["m0", "m1", "m2"]
    rng = np.random.default_rng(0)

    def entries(q):   # output 1 lacks m1; output 2 is F32
        dt = "F32" if q == 2 else "BF16"
        return [(f"{m}.{ab}", dt, (3 + i, 40 + q)) for i, m in enumerate(mods) if not (q == 1 and m == "m1")
                for ab in "AB"]

    ents = [entries(q) for q in range(3)]
    ws = [tensors.SafetensorsWriter(tmp_path / f"{q}.safetensors", ents[q], {"q": str(q)}) for q in range(3)]
    behind = HashBehind([w.temp_path for w in ws], lambda k: k.split(".")[0], chunk=64)
    for m in mods:
        for q, w in enumerate(ws):
            for key, _, shape in ents[q]:
                if key.startswith(m + "."):
                    x = rng.standard_normal(shape).astype(np.float32)
                    if q == 0 and key == "m2.B":
                        x[-1, -1] = np.inf
                    w.write(key, x)
        behind.written(m)
    known = behind.finish()
    known[1] = None   # not followed: hashed afresh
    infos = [MixInfo() for _ in ws]
    commit_all(ws, infos, "BF16", known)
    for q in range(3):
        assert infos[q].sha256 == file_sha256(tmp_path / f"{q}.safetensors")
    # output 0 holds an inf; 1 was hashed afresh as BF16; 2 is F32 (HashBehind knows its dtype)
    assert [i.finite for i in infos] == [False, True, True]

    from loramix.mixing.digests import _start_writeback

    start = _start_writeback()   # what is hashed is handed to the disk (Linux), without waiting
    assert start is not None if sys.platform.startswith("linux") else start is None
    w = tensors.SafetensorsWriter(tmp_path / "x.safetensors", ents[0])
    if start is not None:
        fd = os.open(w.temp_path, os.O_RDONLY)
        assert start(fd, 0, 64) == 0
        os.close(fd)
    behind = HashBehind([w.temp_path], lambda k: k.split(".")[0])
    behind.written("m0")
    behind.close()
    w.abort()
    assert not (tmp_path / "x.safetensors").exists()


def test_outputs_are_hashed_after_the_mix_when_they_cannot_be_followed(w, tmp_path, monkeypatch):
    """HashBehind cannot start (e.g. out of file descriptors): the mix goes on and the outputs are
    hashed and checked after it; the same bytes and checksums."""
    from loramix.bank.integrity import file_sha256
    from loramix.mixing import digests

    ref = generate(w.queries["animals_q"], w.bank, tmp_path / "ref")

    def no_fds(*a, **k):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(digests, "HashBehind", no_fds)
    res = generate(w.queries["animals_q"], w.bank, tmp_path / "out")
    assert _tree(res.out) == _tree(ref.out)
    prov = json.loads((res.out / "loramix.json").read_text())
    assert prov["batch"]["weights_sha256"] == file_sha256(res.out / "adapter_model.safetensors")
