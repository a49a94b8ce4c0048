#!/usr/bin/env python3
"""Do the mini bank's base model and loramix's GGUF adapters run in llama.cpp like in PEFT?

A maintainer's script (not run in CI: the llama.cpp build takes minutes). Run from a loramix
checkout (the dev build in python/ or an installed loramix), with torch, transformers, peft and
gguf installed:

    python3 tools/check_llama_cpp.py [--cache /tmp/loramix-llama] [--version 0.3.36]

1. llama.cpp from PyPI: ``pip download --no-deps --no-binary llama-cpp-python
   llama-cpp-python==VERSION`` (the sdist vendors llama.cpp at ``vendor/llama.cpp`` with
   ``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py`` and ``gguf-py``), unpacked in the cache;
   libllama built there with cmake (target ``llama`` only, ``nice -n 10``, ``-j2``) and a small C
   program (``greedy.c``, below) linked against it: greedy decoding with an optional LoRA adapter
   (``llama_adapter_lora_init`` + ``llama_set_adapters_lora``, scale 1). Everything is reused on a
   second run. (``--no-binary :all:`` would also compile pip's build dependencies, cmake included,
   from source.)
2. converts the shipped base model (``--outtype f32``: its bf16 weights exactly) with the vendored
   ``convert_hf_to_gguf.py``. The converter names a BPE pre-tokenizer by hashing the token ids of a
   test text; a vocabulary trained for the mini bank matches no known hash. The script checks that
   ``tokenizer.json`` pre-tokenizes exactly as GPT-2 does (no normalizer; ``ByteLevel`` with
   ``use_regex: true`` and ``add_prefix_space: false``, which is GPT-2's regex; a ``ByteLevel``
   decoder), then runs the converter with one registration added at import time: this hash ->
   ``"gpt-2"`` (the wrapper below; no file of llama.cpp is changed);
3. generates adapters from the shipped mini bank with this loramix (``generate --format gguf``,
   ``--metric js``, the task's own member excluded): ``factors``, ``svd --rank 4``, ``concat
   --top-k 3`` (one rank each) and ``svd --rank 100`` (mixed ranks: 100 on q_proj, 80 on the
   80-row k_proj / v_proj), plus the same in f32 (``loramix export --outtype f32``); converts each
   PEFT folder with the vendored ``convert_lora_to_gguf.py`` (f16 and f32) and compares the files
   tensor for tensor with ``gguf.GGUFReader`` (exact equality of the bits). For the mixed-rank
   adapter the converter ignores ``rank_pattern`` / ``alpha_pattern``: there the script checks
   that loramix's B equals the converter's times loramix's fold factor (A and the other tensors
   exactly);
4. greedy decoding of ``--prompts`` test prompts per task with llama.cpp (base alone and base +
   each adapter, f32 and f16 files) and with transformers + PEFT in float32; compares the prompt
   ids, the generated ids token for token, and the first step's logits (max |diff|);
5. prints one JSON line. Exit 0 when every file comparison holds and every f32 run matches PEFT
   token for token; f16 adapters are reported (their factors are rounded, so an argmax may flip).
The result of a run is recorded in docs/TOOLS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from hashlib import sha256
from pathlib import Path

TASKS = ("antonym_1", "after_city_1", "reverse_color_1")
MODES = {"factors": [], "svd4": ["--mode", "svd", "--rank", "4"], "concat3": ["--mode", "concat", "--top-k", "3"],
         "mixed": ["--mode", "svd", "--rank", "100"]}
N_PREDICT = 12

GREEDY_C = r"""
/* greedy decoding with llama.cpp: MODEL N_PREDICT [LORA]; prompts on stdin separated by '\0';
   one JSON line per prompt: prompt ids (llama.cpp's tokenizer), generated ids, first logits */
#include "llama.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void quiet(enum ggml_log_level l, const char * t, void * u) { (void) l; (void) t; (void) u; }

int main(int argc, char ** argv) {
    if (argc < 3) { fprintf(stderr, "usage: MODEL N_PREDICT [LORA]\n"); return 2; }
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    struct llama_context_params cp = llama_context_default_params();
    /* one thread: the model is tiny, and ggml's threads spin-wait: on a busy machine two threads made
       a two-prompt run take 26 s instead of 0.2 s */
    cp.n_ctx = 256; cp.n_batch = 256; cp.n_ubatch = 256; cp.n_threads = 1; cp.n_threads_batch = 1;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (argc > 3) {
        struct llama_adapter_lora * ad = llama_adapter_lora_init(model, argv[3]);
        float scale = 1.0f;
        if (!ad || llama_set_adapters_lora(ctx, &ad, 1, &scale) != 0) { fprintf(stderr, "lora %s\n", argv[3]); return 1; }
    }
    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab), n_predict = atoi(argv[2]);
    static char buf[1 << 20];
    size_t len = fread(buf, 1, sizeof buf - 1, stdin), at = 0;
    buf[len] = 0;
    while (at < len) {
        const char * p = buf + at;
        size_t n_p = strlen(p);
        at += n_p + 1;
        llama_token toks[512];
        int n = llama_tokenize(vocab, p, (int) n_p, toks, 512 - n_predict, true, false);
        if (n < 0) { fprintf(stderr, "prompt too long\n"); return 1; }
        llama_memory_clear(llama_get_memory(ctx), true);
        printf("{\"prompt\": [");
        for (int i = 0; i < n; i++) printf(i ? ", %d" : "%d", toks[i]);
        printf("], \"gen\": [");
        struct llama_batch batch = llama_batch_get_one(toks, n);
        llama_token next = 0;
        for (int k = 0; k < n_predict; k++) {
            if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
            const float * lg = llama_get_logits_ith(ctx, -1);
            int best = 0;
            for (int v = 1; v < n_vocab; v++) if (lg[v] > lg[best]) best = v;
            if (k == 0) {
                fprintf(stderr, "{\"logits\": [");
                for (int v = 0; v < n_vocab; v++) fprintf(stderr, v ? ", %.9g" : "%.9g", lg[v]);
                fprintf(stderr, "]}\n");
            }
            printf(k ? ", %d" : "%d", best);
            if (llama_vocab_is_eog(vocab, best)) break;
            next = best;
            batch = llama_batch_get_one(&next, 1);
        }
        printf("]}\n");
    }
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
"""

# Runs a vendored converter with one BPE pre-tokenizer hash registered as "gpt-2" (see 2. above).
CONVERT_WRAPPER = r"""
import ast, inspect, runpy, sys
from hashlib import sha256
llama_dir, chkhsh, script = sys.argv[1:4]
sys.path[:0] = [llama_dir + "/gguf-py", llama_dir]
from conversion import base
orig = base.TextModel.get_vocab_base_pre
src = inspect.getsource(orig)
line = next(l for l in src.splitlines() if l.strip().startswith("chktxt ="))
CHKTXT = ast.literal_eval(line.split("=", 1)[1].strip())
def get_vocab_base_pre(self, tokenizer):
    if sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest() == chkhsh:
        return "gpt-2"
    return orig(self, tokenizer)
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [script] + sys.argv[4:]
runpy.run_path(script, run_name="__main__")
"""


def sh(cmd, log=None, **kw):
    """Run ``cmd``; on failure raise with the end of its output."""
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if log is not None:
        Path(log).write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ...: exit {r.returncode}\n{(r.stdout + r.stderr)[-3000:]}")
    return r


def fetch_and_build(cache: Path, version: str) -> tuple[Path, Path]:
    """The vendored llama.cpp folder and the built greedy program."""
    src = cache / f"llama_cpp_python-{version}"
    if not src.is_dir():
        tgz = cache / f"llama_cpp_python-{version}.tar.gz"
        if not tgz.is_file():
            sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                f"llama-cpp-python=={version}", "-d", cache])
        with tarfile.open(tgz) as t:
            t.extractall(cache, filter="data")
    llama = src / "vendor" / "llama.cpp"
    build = cache / "build"
    exe = cache / f"greedy-{sha256(GREEDY_C.encode()).hexdigest()[:12]}"   # rebuilt when the source changes
    if exe.is_file():
        return llama, exe
    sh(["nice", "-n", "10", "cmake", "-S", llama, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF", "-DGGML_OPENMP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_COMMON=OFF",
        *[f"-DLLAMA_BUILD_{x}=OFF" for x in ("TESTS", "TOOLS", "EXAMPLES", "SERVER", "APP")]],
       log=cache / "cmake-configure.log")
    sh(["nice", "-n", "10", "cmake", "--build", build, "--target", "llama", "-j2"], log=cache / "cmake-build.log")
    (cache / "greedy.c").write_text(GREEDY_C)
    found = {p.name: p for p in build.rglob("lib*.a")}
    libs = [found[n] for n in ("libllama.a", "libggml.a", "libggml-cpu.a", "libggml-base.a")]   # link order
    sh(["gcc", "-O2", "-I", llama / "include", "-I", llama / "ggml" / "include", "-c", cache / "greedy.c",
        "-o", cache / "greedy.o"])
    sh(["g++", "-o", exe, cache / "greedy.o", *libs, "-lpthread", "-lm", "-ldl"])
    return llama, exe


def check_gpt2_pretokenizer(base: Path) -> None:
    """Refuse unless ``tokenizer.json`` pre-tokenizes exactly as GPT-2 (regex included)."""
    tj = json.loads((base / "tokenizer.json").read_text())
    pre, dec, model = tj.get("pre_tokenizer") or {}, tj.get("decoder") or {}, tj["model"]
    ok = (tj.get("normalizer") is None and model["type"] == "BPE" and pre.get("type") == "ByteLevel"
          and pre.get("use_regex") is True and pre.get("add_prefix_space") is False
          and dec.get("type") == "ByteLevel" and not model.get("byte_fallback"))
    if not ok:
        raise SystemExit(f"{base}/tokenizer.json: not GPT-2's byte-level pre-tokenizer; no hash registered")


def chk_hash(llama: Path, base: Path) -> str:
    """The converter's hash of this tokenizer (its own test text, read from its source)."""
    import ast
    from transformers import AutoTokenizer

    src = (llama / "conversion" / "base.py").read_text()
    line = next(x for x in src.splitlines() if x.strip().startswith("chktxt ="))
    tok = AutoTokenizer.from_pretrained(str(base))
    return sha256(str(tok.encode(ast.literal_eval(line.split("=", 1)[1].strip()))).encode()).hexdigest()


def converter_python(cache: Path) -> Path:
    """A venv over this Python's packages (torch, transformers) plus sentencepiece, which the
    converter imports even for a tokenizer without tokenizer.model; made on first use."""
    py = cache / "venv" / "bin" / "python"
    if not py.exists():
        sh([sys.executable, "-m", "venv", "--system-site-packages", cache / "venv"])
        sh([py, "-m", "pip", "install", "-q", "sentencepiece>=0.1.98,<0.3.0"])
    return py


def convert(py: Path, llama: Path, chkhsh: str, script: str, args: list, log: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    sh([py, "-c", CONVERT_WRAPPER, llama, chkhsh, llama / script, *args], log=log, env=env)


def read_gguf(path: Path):
    """{name: (dtype, shape, array)} and the adapter metadata, with the installed gguf reader."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(path))
    meta = {}
    for k in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
        f = r.fields[k]
        v = f.parts[f.data[0]]
        meta[k] = bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else float(v[0])
    return {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), np.asarray(t.data)) for t in r.tensors}, meta


def compare_files(ours: Path, conv: Path, adapter: Path) -> dict:
    """Tensor-for-tensor comparison; B of modules loramix rescales are compared after the fold."""
    import numpy as np
    from loramix.bank import peft_io
    from loramix.mixing.gguf_export import b_factor

    a, ma = read_gguf(ours)
    b, mb = read_gguf(conv)
    spec = peft_io.read_adapter(adapter)
    factors = {}
    for name, ms in spec.modules.items():
        layer, proj = name.split(".")[2], name.rsplit(".", 1)[1]
        factors[f"blk.{layer}.attn_{proj[0]}.weight.lora_b"] = b_factor(spec, ms, spec.lora_alpha)
    res = {"same_names": set(a) == set(b), "same_meta": ma == mb, "bit_equal": 0, "folded": 0, "differ": []}
    for n in sorted(set(a) & set(b)):
        (ta, sa, xa), (tb, sb, xb) = a[n], b[n]
        if ta == tb and sa == sb and np.array_equal(xa.view(np.uint8), xb.view(np.uint8)):
            res["bit_equal"] += 1
            continue
        k = factors.get(n, 1.0)
        if k != 1.0 and ta == tb and sa == sb:
            # loramix rounds B·k once from the PEFT tensor, the converter rounds B: in f16 the two
            # may differ by one unit in the last place of the result
            want = xb.astype(np.float64) * k
            ulps = np.abs(xa.astype(np.float64) - want) / np.spacing(np.abs(want).astype(xa.dtype)).astype(np.float64)
            if float(ulps.max()) <= 1.0:
                res["folded"] += 1
                res["folded_max_ulps"] = max(res.get("folded_max_ulps", 0.0), round(float(ulps.max()), 3))
                continue
        res["differ"].append(n)
    res["n"] = len(a)
    return res


def hf_greedy(base: Path, adapter: Path | None, prompts: list[str], n_predict: int) -> list[dict]:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)   # a tiny model; like llama.cpp's one thread (see greedy.c)
    tok = AutoTokenizer.from_pretrained(str(base))
    m = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, str(adapter))
    m.eval()
    out = []
    for p in prompts:
        ids = tok(p)["input_ids"]
        cur, gen, first = list(ids), [], None
        with torch.no_grad():
            for k in range(n_predict):
                lg = m(torch.tensor([cur])).logits[0, -1].double().numpy()
                first = lg if first is None else first
                t = int(np.argmax(lg))
                gen.append(t)
                if t == tok.eos_token_id:
                    break
                cur.append(t)
        out.append({"prompt": ids, "gen": gen, "logits": first})
    return out


def llama_greedy(exe: Path, model: Path, lora: Path | None, prompts: list[str], n_predict: int) -> list[dict]:
    import numpy as np

    r = subprocess.run([str(exe), str(model), str(n_predict), *([str(lora)] if lora else [])],
                       input="\0".join(prompts).encode(), capture_output=True)
    if r.returncode != 0:
        raise RuntimeError(f"greedy {model} {lora}: {r.stderr.decode()[-2000:]}")
    outs = [json.loads(x) for x in r.stdout.decode().splitlines()]
    logits = [json.loads(x)["logits"] for x in r.stderr.decode().splitlines() if x.startswith('{"logits"')]
    for o, lg in zip(outs, logits, strict=True):
        o["logits"] = np.asarray(lg)
    return outs


def agree(ll: list[dict], hf: list[dict]) -> dict:
    """Prompt ids equal, generations equal token for token, first divergence, max |Δ first logits|."""
    import numpy as np

    res = {"n": len(hf), "same_prompt_ids": 0, "same_tokens": 0, "diverged": [], "max_abs_logit_diff": 0.0}
    for i, (a, b) in enumerate(zip(ll, hf, strict=True)):
        res["same_prompt_ids"] += a["prompt"] == b["prompt"]
        res["same_tokens"] += a["gen"] == b["gen"]
        if a["gen"] != b["gen"]:
            k = next((j for j, (x, y) in enumerate(zip(a["gen"], b["gen"])) if x != y),
                     min(len(a["gen"]), len(b["gen"])))
            res["diverged"].append({"prompt": i, "at": k})
        res["max_abs_logit_diff"] = max(res["max_abs_logit_diff"], float(np.abs(a["logits"] - b["logits"]).max()))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default="/tmp/loramix-llama")
    ap.add_argument("--version", default="0.3.36", help="llama-cpp-python version (its vendored llama.cpp)")
    ap.add_argument("--prompts", type=int, default=4, help="test prompts per task")
    a = ap.parse_args()
    t0 = time.time()
    from importlib import metadata

    import transformers
    import peft
    from loramix.evaluation.bankpaths import default_bank_root, resolve_bank

    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    llama, exe = fetch_and_build(cache, a.version)
    t_build = time.time() - t0
    base = default_bank_root() / "base"
    check_gpt2_pretokenizer(base)
    h = chk_hash(llama, base)
    work = cache / "run"
    work.mkdir(exist_ok=True)
    base_gguf = work / "base-f32.gguf"
    py = converter_python(cache)
    convert(py, llama, h, "convert_hf_to_gguf.py", [base, "--outtype", "f32", "--outfile", base_gguf],
            work / "convert-base.log")
    bank = resolve_bank("default", cache=cache / "bank-index").bank
    cli = [sys.executable, "-m", "loramix.cli"]
    summary = {"llama_cpp_python": a.version, "gguf_py_vendored": gguf_version(llama), "gguf": metadata.version("gguf"),
               "transformers": transformers.__version__, "peft": peft.__version__, "base_pre": "gpt-2",
               "chkhsh": h, "build_s": round(t_build), "files": {}, "greedy": {}}
    runs = {"base": (None, None)}
    for task in TASKS:
        for mode, extra in MODES.items():
            out = work / f"{task}-{mode}"
            sh([*cli, "generate", default_bank_root() / "bank" / task / "train.jsonl", "--bank", bank, "-o", out,
                "--metric", "js", "--exclude", task, "--format", "gguf", "--overwrite", *extra])
            sh([*cli, "export", out, "--format", "gguf", "--outtype", "f32", "-o", out / "adapter_model-f32.gguf"])
            for t in ("f16", "f32"):
                ours = out / ("adapter_model.gguf" if t == "f16" else "adapter_model-f32.gguf")
                conv = out.parent / f"{out.name}-converter-{t}.gguf"
                convert(py, llama, h, "convert_lora_to_gguf.py",
                        [out, "--base", base, "--outtype", t, "--outfile", conv], work / f"convert-{out.name}-{t}.log")
                summary["files"][f"{task}/{mode}/{t}"] = compare_files(ours, conv, out)
                runs[f"{task}/{mode}/{t}"] = (out, ours)
    prompts = {task: [json.loads(x)["input"] for x in
                      (default_bank_root() / "bank" / task / "test.jsonl").read_text().splitlines()[:a.prompts]]
               for task in TASKS}
    for key, (peft_dir, lora) in runs.items():
        tasks = TASKS if key == "base" else [key.split("/")[0]]
        ps = [p for t in tasks for p in prompts[t]]
        summary["greedy"][key] = agree(llama_greedy(exe, base_gguf, lora, ps, N_PREDICT),
                                       hf_greedy(base, peft_dir, ps, N_PREDICT))
    g = summary["greedy"]
    f32 = [v for k, v in g.items() if not k.endswith("/f16")]
    f16 = [v for k, v in g.items() if k.endswith("/f16")]
    files = summary["files"].values()
    summary["totals"] = {
        "files_equal": sum(not f["differ"] and f["same_names"] and f["same_meta"] for f in files),
        "files": len(summary["files"]),
        "f32_same_tokens": f"{sum(v['same_tokens'] for v in f32)}/{sum(v['n'] for v in f32)}",
        "f16_same_tokens": f"{sum(v['same_tokens'] for v in f16)}/{sum(v['n'] for v in f16)}",
        "same_prompt_ids": f"{sum(v['same_prompt_ids'] for v in g.values())}/{sum(v['n'] for v in g.values())}",
        "max_abs_logit_diff_f32": max(v["max_abs_logit_diff"] for v in f32),
        "max_abs_logit_diff_f16": max(v["max_abs_logit_diff"] for v in f16)}
    tot = summary["totals"]
    summary["ok"] = bool(tot["files_equal"] == tot["files"] and all(v["same_tokens"] == v["n"] for v in f32)
                         and all(v["same_prompt_ids"] == v["n"] for v in g.values()))
    summary["seconds"] = round(time.time() - t0)
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    short = {k: v for k, v in summary.items() if k not in ("files", "greedy")}
    print(json.dumps(short))
    return 0 if summary["ok"] else 1


def gguf_version(llama: Path) -> str:
    for line in (llama / "gguf-py" / "pyproject.toml").read_text().splitlines():
        if line.startswith("version"):
            return line.split("=", 1)[1].strip().strip('"')
    return "?"


if __name__ == "__main__":
    sys.exit(main())
