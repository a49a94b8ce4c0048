"""Command-line habits: --version, "did you mean", JSON errors, readable batch names, local resume,
progress while the bank is embedded, honest eval findings, Dask's split from the CLI."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

import _tiny
from loramix.bank.bank import build_bank
from loramix.mixing.output import output_names
from loramix.pipeline import OutputError, generate
from loramix.version import __version__


def test_version():
    r = _tiny.run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"loramix {__version__}"


def test_did_you_mean_command_and_option(w, tmp_path):
    r = _tiny.run_cli("genrate", "x")
    assert r.returncode == 2 and "did you mean 'generate'?" in r.stderr
    r = _tiny.run_cli("generate", w.queries["music_q"], "--bank", w.bank, "-o", tmp_path / "o", "--top-kk", "2")
    assert r.returncode == 2 and "unrecognized arguments: --top-kk 2; did you mean --top-k?" in r.stderr
    assert not (tmp_path / "o").exists()
    r = _tiny.run_cli("bank", "infoo", w.bank)
    assert r.returncode == 2 and "did you mean 'info'?" in r.stderr


def test_failed_json_run_prints_a_json_error(w, tmp_path):
    r = _tiny.run_cli("--json", "generate", tmp_path / "nope.jsonl", "--bank", w.bank, "-o", tmp_path / "o")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 1 and "nope.jsonl" in doc["error"]["message"] and doc["error"]["type"]
    assert r.stderr.strip().splitlines()[-1].startswith("loramix: error:")
    r = _tiny.run_cli("generate", "--json", "--bogus")   # usage errors too
    assert r.returncode == 2 and json.loads(r.stdout)["error"]["type"] == "UsageError"
    r = _tiny.run_cli("generate", tmp_path / "nope.jsonl", "--bank", w.bank, "-o", tmp_path / "o")
    assert r.returncode == 1 and r.stdout == ""   # without --json: stdout stays clean


def test_same_file_names_get_readable_unique_names(w, tmp_path):
    a = _tiny.write_jsonl(tmp_path / "animals" / "train.jsonl", _tiny.make_examples("animals", 8, 1))
    b = _tiny.write_jsonl(tmp_path / "music" / "train.jsonl", _tiny.make_examples("music", 8, 2))
    res = generate([a, b], w.bank, tmp_path / "out")
    assert [r.out.name for r in res] == ["animals-train", "music-train"]
    assert output_names(["train", "train", "x"], ["/d/a/s/train.jsonl", "/d/b/s/train.jsonl", "/d/x.jsonl"]) == \
        ["a-s-train", "b-s-train", "x"]
    assert output_names(["t", "t"], ["/same/t.jsonl", "/same/t.jsonl"]) == ["same-t", "same-t-2"]   # one file twice


def test_local_batch_resumes_like_dask(w, tmp_path):
    qs = [w.queries["animals_q"], w.queries["music_q"]]
    full = tmp_path / "full"
    generate(qs, w.bank, full, top_k=3)
    out = tmp_path / "out"
    shutil.copytree(full, out)
    shutil.rmtree(out / "music_q")   # a run interrupted after its first output
    before = (out / "animals_q" / "adapter_model.safetensors").stat().st_mtime_ns
    res = generate(qs, w.bank, out, top_k=3)
    assert [r.status for r in res] == ["skipped", "generated"]
    assert (out / "animals_q" / "adapter_model.safetensors").stat().st_mtime_ns == before   # not rewritten
    for n in ("animals_q", "music_q"):   # the bits of an uninterrupted run
        assert (out / n / "adapter_model.safetensors").read_bytes() == \
            (full / n / "adapter_model.safetensors").read_bytes()
    # an output that fails verification is refused, and replaced with --overwrite
    with open(out / "music_q" / "adapter_model.safetensors", "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\0\0\0\1")
    with pytest.raises(OutputError, match="music_q exists and is not a finished adapter"):
        generate(qs, w.bank, out, top_k=3)
    res = generate(qs, w.bank, out, top_k=3, overwrite=True)
    assert [r.status for r in res] == ["skipped", "generated"]
    assert (out / "music_q" / "adapter_model.safetensors").read_bytes() == \
        (full / "music_q" / "adapter_model.safetensors").read_bytes()
    r = _tiny.run_cli("generate", *qs, "--bank", w.bank, "-o", out, "--top-k", "3", "--json")
    assert r.returncode == 0, r.stderr
    assert [a["status"] for a in json.loads(r.stdout)["adapters"]] == ["skipped", "skipped"]


def test_cosine_shows_progress_while_embedding_the_bank(w, tmp_path, capfd):
    bank = tmp_path / "bank"
    shutil.copytree(w.bank, bank)
    build_bank(bank, w.tokenizer)
    capfd.readouterr()
    generate(w.queries["music_q"], bank, tmp_path / "o1", metric="cosine", progress=True)
    err = capfd.readouterr().err
    assert "embed bank datasets (4 of 4 members)" in err and "4/4" in err
    generate(w.queries["music_q"], bank, tmp_path / "o2", metric="cosine", progress=True)
    assert "embed bank datasets" not in capfd.readouterr().err   # stored in the profiles: nothing to embed


def _results(path, n_tasks, rng):
    with open(path / "results.csv", "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["task", "system", "n", "rougeL", "exact", "subseq"])
        for t in range(n_tasks):
            for s, mu in (("base", 0.1), ("normalized-js", 0.5), ("task-lora", 0.9)):
                wr.writerow([f"t{t}", s, 4, mu + rng.normal(0, 0.01), 0, 0])


def test_eval_with_few_tasks_states_the_sample_and_claims_nothing(tmp_path):
    from loramix.evaluation.loo import summarize_results

    rng = np.random.default_rng(0)
    (tmp_path / "two").mkdir()
    _results(tmp_path / "two", 2, rng)
    s = summarize_results(tmp_path / "two")
    f = s["findings"]
    assert f["tasks"] == 2 and f["ci_supported"] is False and f["best_above_base_ci_disjoint"] is None
    table = (tmp_path / "two" / "table.md").read_text()
    assert "over 2 held-out tasks (8 examples)" in table and "no claim" in table
    assert "do not overlap" not in table and "disjoint" not in table
    (tmp_path / "many").mkdir()
    _results(tmp_path / "many", 12, rng)
    f = summarize_results(tmp_path / "many")["findings"]
    assert f["tasks"] == 12 and f["best_above_base_ci_disjoint"] is True
    assert "over 12 held-out tasks" in (tmp_path / "many" / "table.md").read_text()


def test_dask_split_from_the_cli(w, tmp_path):
    r = _tiny.run_cli("generate", w.queries["music_q"], "--bank", w.bank, "-o", tmp_path / "o",
                      "--dask-split", "modules")
    assert r.returncode == 1 and "give --scheduler too" in r.stderr
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=1, processes=True, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address=None,
                      scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"}) as cluster:
        for split in ("modules", "targets"):
            r = _tiny.run_cli("generate", w.queries["music_q"], w.queries["animals_q"], "--bank", w.bank,
                              "-o", tmp_path / split, "--scheduler", cluster.scheduler_address,
                              "--dask-split", split, "--dask-parts", "2", "--json")
            assert r.returncode == 0, r.stderr
            prov = json.loads((tmp_path / split / "music_q" / "loramix.json").read_text())
            assert prov["batch"]["split"] == split
