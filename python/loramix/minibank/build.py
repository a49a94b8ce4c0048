"""Build a mini bank: tokenizer, tiny Mistral base model, one PEFT LoRA per task, all on CPU.

Layout written under ``out``::

    base/            config.json, generation_config.json, model.safetensors (bf16),
                     tokenizer.json, tokenizer_config.json
    bank/<task>/     adapter_config.json, adapter_model.safetensors (fp32),
                     train.jsonl, valid.jsonl, test.jsonl   (Lots-of-LoRAs format)
    build_manifest.json   suite name + fingerprint, seeds, configs, per-task family, sha256 of
                          every file above

Determinism: every random draw comes from a seed derived from the suite seed and a label;
torch runs with ``use_deterministic_algorithms(True)`` and a fixed thread count, so rebuilding on
the same machine and library versions gives byte-identical files. (Different CPUs/BLAS may round
float sums differently; the manifest records the versions used.)

The base model is trained once in fp32, rounded to bf16 (what ships), and every adapter is
trained against that bf16-rounded base, so the bank is consistent with the shipped base.
Every adapter starts from the same LoRA init (``lora.init_seed``), as in a bank produced by one
training script with a fixed seed; only the data order differs by task.
"""
from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

from loramix.bank.integrity import file_sha256
from loramix.minibank.suite import generate_pretrain, generate_task, load_suite, seed_for, suite_fingerprint, task_specs

__all__ = ["build", "file_hashes", "scaled_suite", "MANIFEST"]

MANIFEST = "build_manifest.json"
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def _log(msg: str) -> None:
    print(f"[minibank {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def portable_tokenizer_config(base_dir: Path) -> None:
    """Name the tokenizer class every transformers from 4.4x to 5.x knows: transformers 5 saves
    ``TokenizersBackend`` (and a ``backend`` key), which 4.x cannot load; ``PreTrainedTokenizerFast``
    loads the same tokenizer.json in both (5.x maps it onto its backend), with the same ids."""
    p = Path(base_dir) / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    cfg.pop("backend", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the manifest, keyed by posix relative path."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): file_sha256(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def scaled_suite(suite: dict, scale: str) -> dict:
    """``full`` (as is) or ``tiny`` (two tasks of two families, few steps: a fast rebuild check)."""
    if scale == "full":
        return suite
    if scale != "tiny":
        raise ValueError(f"unknown scale {scale!r}")
    s = json.loads(json.dumps(suite))
    s["families"] = [dict(f, tasks=f["tasks"][:2]) for f in s["families"][:2]]
    s["splits"] = {"train": 24, "valid": 4, "test": 4}
    s["pretrain"]["lines"] = 200
    s["model"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    s["tokenizer"]["vocab_size"] = 300
    s["base_training"].update(steps=6, batch_size=8, warmup=2)
    s["lora"].update(steps=4, batch_size=4, warmup=1)
    s["name"] = suite["name"] + "-tiny"
    return s


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def _train_tokenizer(texts: list[str], cfg: dict):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg["vocab_size"], min_frequency=cfg["min_frequency"],
                                  special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    # like Mistral's tokenizer: <s> prepended, no </s> (training appends it to answers)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", bos), ("</s>", eos)])
    return tok


def _set_determinism(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def _batches(rng: random.Random, n: int, bs: int, steps: int):
    order: list[int] = []
    for _ in range(steps):
        if len(order) < bs:
            more = list(range(n))
            rng.shuffle(more)
            order += more
        yield order[:bs]
        order = order[bs:]


def _collate(seqs: list[tuple[list[int], list[int]]], pad_id: int):
    """(ids, labels) pairs -> right-padded tensors; labels -100 where no loss."""
    import torch

    L = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), L), -100, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, (s, lb) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        lab[i, :len(lb)] = torch.tensor(lb)
        att[i, :len(s)] = 1
    return ids, att, lab


def _lr(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * p))


def _train(model, params, data, cfg: dict, seed: int, pad_id: int, label: str, log_every: int = 0):
    import torch

    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0),
                            betas=(0.9, 0.98))
    rng = random.Random(seed)
    model.train()
    ema = None
    for step, idx in enumerate(_batches(rng, len(data), cfg["batch_size"], cfg["steps"])):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg["steps"], cfg["lr"], cfg["warmup"])
        ids, att, lab = _collate([data[i] for i in idx], pad_id)
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if log_every and (step + 1) % log_every == 0:
            _log(f"{label} step {step + 1}/{cfg['steps']} loss {ema:.3f}")
    model.eval()
    return ema


def encode_example(tok, prompt: str, answer: str | None, eos_id: int) -> tuple[list[int], list[int]]:
    """``<s> prompt`` then `` answer</s>``; loss on the answer and ``</s>`` only."""
    p = tok.encode(prompt).ids
    if answer is None:
        return p, []
    a = tok.encode(" " + answer, add_special_tokens=False).ids + [eos_id]
    return p + a, [-100] * len(p) + a


def _check_replaceable(out: Path) -> None:
    """``force`` replaces a previous mini bank only: never a folder of someone else's files, a
    link, or the current folder or one holding it."""
    cwd, real = Path(os.path.realpath(os.getcwd())), Path(os.path.realpath(out))
    if not (out / MANIFEST).is_file():
        raise FileExistsError(f"{out} is not empty and holds no mini bank (no {MANIFEST}); not deleted, "
                              "even with --force")
    if out.is_symlink() or real == cwd or real in cwd.parents:
        raise FileExistsError(f"{out} is a link, the current folder or holds it; not deleted, even with --force")


def build(suite: dict | str, out: str | os.PathLike, *, scale: str = "full", threads: int | None = None,
          force: bool = False, jobs: int = 1) -> dict:
    """Build the bank for ``suite`` into ``out`` and return the manifest.

    ``jobs`` > 1 trains the per-task LoRAs in that many processes (each with ``threads`` torch
    threads); the files are byte-identical to ``jobs=1``."""
    import peft
    import tokenizers
    import torch
    import transformers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    from loramix.minibank import realtasks

    t_start = time.time()
    if isinstance(suite, dict) and suite.get("tasks_dir"):
        real = True   # a real-task suite (realtasks.tasks_suite): already at its scale
    else:
        real = False
        suite = scaled_suite(load_suite(suite) if isinstance(suite, str) else suite, scale)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty (use force=True / --force)")
        _check_replaceable(out)
        shutil.rmtree(out)
    threads = threads or suite.get("threads", 2)
    _set_determinism(threads)
    specs = realtasks.task_specs(suite) if real else task_specs(suite)
    _log(f"suite {suite['name']}: {len(specs)} tasks in {len(suite['families'])} families -> {out}")

    # 1. data
    bank = out / "bank"
    data = {}
    for spec in specs:
        d = realtasks.split_task(suite, spec["name"]) if real else generate_task(suite, spec)
        data[spec["name"]] = d
        tdir = bank / spec["name"]
        tdir.mkdir(parents=True)
        for split, rows in d.items():
            _write_jsonl(tdir / f"{split}.jsonl", rows)
    corpus = realtasks.pretrain_corpus(data) if real else generate_pretrain(suite, suite["pretrain"]["lines"])
    cut = suite.get("max_tokens")   # real prompts can be long: keep the last tokens

    def fit(pair):
        return pair if not cut or len(pair[0]) <= cut else (pair[0][-cut:], pair[1][-cut:])

    # 2. tokenizer (pre-training corpus + task training splits: it only has to spell them)
    tok_texts = corpus + [r["input"] + " " + r["output"][0] for n in data for r in data[n]["train"]]
    tok = _train_tokenizer(tok_texts, suite["tokenizer"])
    pad_id, bos_id, eos_id = (tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>"))
    _log(f"tokenizer: {tok.get_vocab_size()} tokens")

    # 3. base model
    base_dir = out / "base"
    mc = suite["model"]
    config = MistralConfig(vocab_size=tok.get_vocab_size(), bos_token_id=bos_id, eos_token_id=eos_id,
                           pad_token_id=pad_id, sliding_window=None, attention_dropout=0.0,
                           hidden_act="silu", rms_norm_eps=1e-6, initializer_range=0.02, **mc)
    torch.manual_seed(seed_for(suite["seed"], "base-init") % (2**31))
    model = MistralForCausalLM(config).float()
    pre = []
    for line in corpus:
        if "\nOutput:" in line:  # a prompt + answer: same tokenization as the tasks
            prompt, ans = line.split("\nOutput: ", 1)
            ids, _ = encode_example(tok, prompt + "\nOutput:", ans, eos_id)
        else:
            ids = tok.encode(line).ids + [eos_id]
        ids = fit((ids, ids))[0]
        pre.append((ids, ids))  # LM loss on every token
    bt = suite["base_training"]
    nparams = sum(p.numel() for p in model.parameters())
    _log(f"pre-training base ({nparams / 1e6:.2f} M params) for {bt['steps']} steps")
    loss = _train(model, list(model.parameters()), pre, bt, seed_for(suite["seed"], "base-order"),
                  pad_id, "base", log_every=max(1, bt["steps"] // 10))
    with torch.no_grad():  # what ships is bf16; adapters train against exactly that
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.to(torch.bfloat16).save_pretrained(base_dir, safe_serialization=True)
    model.float()
    model.generation_config.save_pretrained(base_dir)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                     unk_token="<unk>", pad_token="<pad>", padding_side="left",
                                     model_max_length=mc["max_position_embeddings"])
    hf_tok.save_pretrained(base_dir)
    portable_tokenizer_config(base_dir)
    _log(f"base done, loss {loss:.3f}")

    # 4. one LoRA per task (in ``jobs`` processes when asked: each loads the bf16 base from disk,
    #    which equals the bf16-rounded model in memory, so the files are the same either way)
    rows = {s["name"]: [fit(encode_example(tok, r["input"], r["output"][0], eos_id)) for r in data[s["name"]]["train"]]
            for s in specs}
    jobs = max(1, min(int(jobs or 1), len(specs)))
    results = {}
    if jobs == 1:
        for i, spec in enumerate(specs):
            name = spec["name"]
            model, results[name] = _fit_lora(model, suite, name, rows[name], bank / name, pad_id)
            _log(f"[{i + 1}/{len(specs)}] {name}: loss {results[name]['train_loss']:.3f} "
                 f"({results[name].pop('seconds'):.1f}s)")
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")   # a fresh interpreter: no inherited OpenMP state
        work = [(str(base_dir), suite, s["name"], rows[s["name"]], str(bank / s["name"]), pad_id, threads)
                for s in specs]
        with ctx.Pool(jobs) as pool:
            for i, (name, res) in enumerate(pool.imap_unordered(_fit_lora_job, work)):
                results[name] = res
                _log(f"[{i + 1}/{len(specs)}] {name}: loss {res['train_loss']:.3f} ({res.pop('seconds'):.1f}s)")

    manifest = {
        "suite": suite["name"],
        "suite_fingerprint": suite_fingerprint({k: v for k, v in suite.items() if k != "tasks_dir"}),
        "scale": scale,
        "seed": suite["seed"],
        "threads": threads,
        "tasks": {s["name"]: {"family": s["family"], "op": s["op"], **results[s["name"]]} for s in specs},
        **({"task_files": suite["task_files"], "max_tokens": suite.get("max_tokens")} if real else {}),
        "families": [f["name"] for f in suite["families"]],
        "config": {k: suite[k] for k in ("splits", "tokenizer", "model", "base_training", "lora")},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "tokenizers": tokenizers.__version__},
        "build_seconds": round(time.time() - t_start, 1),
        "files": file_hashes(out),
    }
    with open(out / MANIFEST, "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.write("\n")
    _log(f"done in {manifest['build_seconds']:.0f}s")
    return manifest


def _fit_lora(model, suite: dict, name: str, rows, tdir: Path, pad_id: int):
    """Train task ``name``'s LoRA on ``model`` (the float32 copy of the bf16 base), save it into
    ``tdir``; return the base back (LoRA layers removed) and ``{"train_loss", "seconds"}``."""
    import torch
    from peft import LoraConfig, get_peft_model

    t0 = time.time()
    lc = suite["lora"]
    lcfg = dict(r=lc["r"], lora_alpha=lc["lora_alpha"], lora_dropout=lc["lora_dropout"],
                target_modules=list(lc["target_modules"]), bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(lc["init_seed"])
    pm = get_peft_model(model, LoraConfig(**lcfg))
    params = [p for p in pm.parameters() if p.requires_grad]
    loss = _train(pm, params, rows, lc, seed_for(suite["seed"], "lora-order", name), pad_id, name)
    pm.save_pretrained(tdir, safe_serialization=True)
    _fix_adapter_dir(tdir)
    return pm.unload(), {"train_loss": round(loss, 4), "seconds": time.time() - t0}


_WORKER_BASE: dict = {}


def _fit_lora_job(job):
    """One LoRA in a worker process: the base is loaded from disk once per process."""
    base_dir, suite, name, rows, tdir, pad_id, threads = job
    if base_dir not in _WORKER_BASE:
        import torch
        from transformers import MistralForCausalLM

        _set_determinism(threads)
        _WORKER_BASE.clear()
        base = MistralForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        # the in-process model went to bf16 and back, rotary buffers included: do the same
        _WORKER_BASE[base_dir] = base.to(torch.bfloat16).float()
    model, res = _fit_lora(_WORKER_BASE[base_dir], suite, name, rows, Path(tdir), pad_id)
    _WORKER_BASE[base_dir] = model
    return name, res


def _fix_adapter_dir(tdir: Path) -> None:
    """Keep the two adapter files only, with a relative base path and no build-time noise."""
    readme = tdir / "README.md"
    if readme.exists():
        readme.unlink()
    cfg_path = tdir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "../../base"  # relative to the adapter dir
    cfg.pop("revision", None)
    if isinstance(cfg.get("target_modules"), list):  # PEFT writes a set: order varies by process
        cfg["target_modules"] = sorted(cfg["target_modules"])
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh, indent=2, sort_keys=True)
        fh.write("\n")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m loramix.minibank build")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--suite", default="default", help="'default', a .json file or a .py file/module defining SUITE")
    g.add_argument("--tasks", default=None,
                   help="a folder of real task files (<name>.jsonl, Lots-of-LoRAs layout; tasks.json for categories)")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--scale", default="full", choices=["full", "tiny"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=1,
                    help="train the per-task LoRAs in this many processes (same files as 1)")
    ap.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    a = ap.parse_args(argv)
    if a.tasks:
        from loramix.minibank.realtasks import tasks_suite

        build(tasks_suite(a.tasks, scale=a.scale), a.out, scale=a.scale, threads=a.threads, force=a.force,
              jobs=a.jobs)
    else:
        build(a.suite, a.out, scale=a.scale, threads=a.threads, force=a.force,
              jobs=a.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
