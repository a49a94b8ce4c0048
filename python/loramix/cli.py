"""The ``loramix`` command line.

    loramix bank build DIR --tokenizer PATH      profile the members, write DIR/bank.json
    loramix bank pull REPO_ID... --to DIR        download adapters (+ datasets) from the Hub
    loramix bank info DIR                        what a bank holds
    loramix bank train-combiner DIR              train the bank's neural combiner (pipeline neural)
    loramix profile DATASET --bank DIR -o F.npz  a dataset's token profile
    loramix generate DATASET... --bank DIR -o OUT
    loramix generate --from OUT/loramix.json -o NEW   the same adapter again, bit for bit
    loramix explain OUT [--png]                  top contributors (+ a PNG bar chart)
    loramix export OUT --format gguf             a llama.cpp LoRA adapter (GGUF)
    loramix eval leave-one-out --bank DIR        held-out comparison over a bank with test splits
    loramix eval retrieval --tasks DIR           do the metrics find same-category tasks? (no adapters)
    loramix demo [--task NAME]                   the built-in job on the shipped mini bank
    loramix bench [--scale laptop|paper] [--suite kernels|mix|e2e|all]   speed/memory vs peers

Errors end with a one-line ``loramix: error: ...`` and a non-zero exit (``--debug`` shows the
traceback). ``--json`` prints one JSON document on stdout for scripts, also on failure (an
``{"error": ...}`` object, :mod:`loramix.cliutil`); progress goes to stderr. ``--version``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path


def _fields(s: str) -> tuple:
    return tuple(f.strip() for f in s.split(",") if f.strip())


class _Version(argparse.Action):
    """argparse's ``version`` action, the version looked up only when asked (loramix.version)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="show program's version number and exit"):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from loramix.version import version

        print(f"loramix {version()}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    def flags(default):
        c = argparse.ArgumentParser(add_help=False)
        c.add_argument("--json", action="store_true", default=default, help="print a JSON document for scripts")
        c.add_argument("--debug", action="store_true", default=default, help="show tracebacks on errors")
        c.add_argument("--quiet", "-q", action="store_true", default=default, help="no progress bars")
        return c

    # the flags work before or after the subcommand: below it they do not reset what was given above
    top, common = flags(False), flags(argparse.SUPPRESS)
    from loramix.cliutil import Parser

    p = Parser(prog="loramix", parents=[top], description="LoRA adapters for a new dataset from a bank, on a CPU.")
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="cmd", required=True)

    bank = sub.add_parser("bank", help="build, pull or inspect a bank", parents=[common])
    bsub = bank.add_subparsers(dest="bank_cmd", required=True)
    b = bsub.add_parser("build", help="profile members and write bank.json", parents=[common])
    b.add_argument("dir")
    b.add_argument("--tokenizer", required=True, help="tokenizer.json or a folder holding it")
    b.add_argument("--fields", type=_fields, default=("input", "output"), help="text fields, comma-separated")
    b.add_argument("--base-model", default=None, help="the bank's base model (default: most members')")
    b.add_argument("--split", default="train")
    b.add_argument("--embeddings", action="store_true",
                   help="also store the members' sentence embeddings (metric cosine) in their profiles")
    b.add_argument("--encoder", default=None, help="with --embeddings: a BERT-family folder (default MiniLM)")
    b.add_argument("--quantize", default=None, choices=["int8", "int8-all", "int8-block"])
    b.add_argument("--cap", type=int, default=None, help="with --embeddings: examples embedded per member (default 1000)")
    pl = bsub.add_parser("pull", help="download adapters and their datasets from the Hub", parents=[common])
    pl.add_argument("repo_ids", nargs="+")
    pl.add_argument("--to", required=True)
    pl.add_argument("--dataset", action="append", default=None,
                    help="dataset repo for each adapter, in order (default: from the adapter's card)")
    pl.add_argument("--no-datasets", action="store_true", help="adapters only")
    pl.add_argument("--revision", default=None)
    pl.add_argument("--cache-dir", default=None, help="default: the HF cache (HF_HOME / HF_HUB_CACHE)")
    pl.add_argument("--tokenizer", default=None, help="build the bank afterwards with this tokenizer")
    i = bsub.add_parser("info", help="what a bank holds", parents=[common])
    i.add_argument("dir")
    bv = bsub.add_parser("verify", help="check every member byte against the hashes recorded at build",
                         parents=[common])
    bv.add_argument("dir")
    tc = bsub.add_parser("train-combiner", help="train the bank's neural combiner (pipeline neural)",
                         parents=[common])
    tc.add_argument("dir")
    tc.add_argument("--metric", type=_fields, default=("js",), help="token metrics, comma-separated (js,kl,wd,mmd)")
    tc.add_argument("--cosine", action="store_true", help="add the sentence-embedding cosine features")
    tc.add_argument("--space", default="factors", choices=["factors", "delta"],
                    help="reconstruct members in factor space (mode factors) or delta space (concat/svd)")
    tc.add_argument("--hidden", type=int, default=16)
    tc.add_argument("--max-epochs", type=int, default=500)
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--encoder", default=None, help="with --cosine: a BERT-family folder (default MiniLM)")
    tc.add_argument("--quantize", default=None, choices=["int8", "int8-all", "int8-block"])

    pr = sub.add_parser("profile", help="a dataset's token profile (.npz)", parents=[common])
    pr.add_argument("dataset")
    g = pr.add_mutually_exclusive_group(required=True)
    g.add_argument("--bank", help="use the bank's tokenizer")
    g.add_argument("--tokenizer", help="tokenizer.json or a folder holding it")
    pr.add_argument("-o", "--out", required=True)
    pr.add_argument("--fields", type=_fields, default=None)
    pr.add_argument("--split", default="train")

    ge = sub.add_parser("generate", help="generate adapter(s) for dataset(s)", parents=[common])
    ge.add_argument("datasets", nargs="*", help="dataset files/folders or saved profiles (.npz)")
    ge.add_argument("--bank", default=None, help="bank folder (with bank.json)")
    ge.add_argument("-o", "--out", default=None,
                    help="output adapter folder (with several datasets: a folder of adapters)")
    ge.add_argument("--pipeline", default="normalized",
                    help="attentional | normalized (the paper's best) | neural (bank train-combiner) | any registered")
    ge.add_argument("--metric", default="hybrid",   # = loramix.weights.DEFAULT_METRIC (not imported: fast start)
                    help="hybrid (default: js + the datasets' instructions embedded) | js (the paper's) | kl | wd | "
                         "mmd | cosine (sentence embeddings) | instruction | any registered metric")
    ge.add_argument("--mode", default="factors", choices=["factors", "concat", "svd"])
    ge.add_argument("--top-k", type=int, default=None, help="keep the k nearest members, renormalized")
    ge.add_argument("--temperature", type=float, default=0.25,
                    help="softmin temperature (default 0.25; the paper's: --metric js --temperature 1)")
    ge.add_argument("--rank", type=int, default=None, help="svd mode: output rank (default: the bank's)")
    ge.add_argument("--dtype", default=None, help="f32, f16 or bf16 (default: the bank's)")
    ge.add_argument("--exclude", action="append", default=[], help="member to leave out (repeatable)")
    ge.add_argument("--leave-one-out", action="store_true",
                    help="leave out members trained on the very same data (same content hash)")
    ge.add_argument("--protocol", default="loramix", choices=["loramix", "paper"],
                    help="paper: excluded members enter the row's mean/std before they are dropped (the paper's code)")
    ge.add_argument("--fields", type=_fields, default=None)
    ge.add_argument("--split", default="train")
    ge.add_argument("--profile-cache", default=None, help="folder to keep query profiles in")
    ge.add_argument("--overwrite", action="store_true", help="replace an existing output (atomically)")
    ge.add_argument("--verify", action="store_true", help="first check every bank member byte (bank verify)")
    ge.add_argument("--encoder", default=None, help="metric cosine: a BERT-family encoder folder (default MiniLM)")
    ge.add_argument("--quantize", default=None, choices=["int8", "int8-all", "int8-block"], help="metric cosine: int8 encoder")
    ge.add_argument("--cap", type=int, default=None,
                    help="metric cosine: examples embedded per dataset (default 1000; 64 is much faster)")
    ge.add_argument("--combiner", default=None, help="pipeline neural: combiner .onnx (default BANK/combiner.onnx)")
    ge.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                    help="run the batch on this Dask scheduler (pip install 'loramix[dask]'); bank and "
                         "outputs must be on a filesystem every worker sees")
    ge.add_argument("--connect-timeout", type=float, default=None, metavar="SECONDS",
                    help="with --scheduler: give up when it has not answered after this long (default 10)")
    _add_generate_extras(ge)

    ex = sub.add_parser("explain", help="top contributors of a generated adapter", parents=[common])
    ex.add_argument("out")
    ex.add_argument("--png", nargs="?", const="", default=None, metavar="PATH",
                    help="also write a bar chart (needs matplotlib: pip install 'loramix[plot]'); "
                         "default path OUT/weights.png")
    ex.add_argument("--top", type=int, default=10)
    _add_eval_demo(sub, common)
    _add_export(sub, common)

    b = sub.add_parser("bench", add_help=False,
                       help="speed and memory vs peers (runs the harness in a source checkout's benches/)")
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of the harness (--help lists them)")
    return p


def _add_generate_extras(ge) -> None:
    """Options of ``generate`` for portable outputs, recipes and Dask."""
    ge.add_argument("--base-model", default=None, metavar="HUB_ID_OR_DIR",
                    help="base model written into the adapter (default: the bank's, as a Hub id or an "
                         "absolute path, so the adapter loads from any folder)")
    ge.add_argument("--from", dest="recipe", default=None, metavar="OUT/loramix.json",
                    help="make an adapter again, bit for bit, from the recipe in a generated adapter's "
                         "loramix.json (then give only -o)")
    ge.add_argument("--dask-split", default=None, choices=["auto", "modules", "targets"],
                    help="with --scheduler: split the batch by module slices or by target groups "
                         "(default auto; see docs/distributed.md)")
    ge.add_argument("--dask-parts", type=int, default=None, metavar="N",
                    help="with --scheduler: module slices or target groups (default: worker threads)")
    ge.add_argument("--format", default="peft", choices=["peft", "gguf"],
                    help="gguf: also write OUT/adapter_model.gguf, a llama.cpp LoRA adapter (pip install "
                         "'loramix[gguf]')")


def _add_export(sub, common) -> None:
    ex = sub.add_parser("export", parents=[common], help="write a generated adapter in another format (gguf)")
    ex.add_argument("adapter", help="a PEFT LoRA adapter folder")
    ex.add_argument("--format", required=True, choices=["gguf"])
    ex.add_argument("-o", "--out", default=None, help="output file (default: ADAPTER/adapter_model.gguf)")
    ex.add_argument("--base", default=None, help="base model folder (default: the adapter's base model)")
    ex.add_argument("--outtype", default="f16", choices=["f16", "f32"],
                    help="tensor type (default f16; convert_lora_to_gguf.py --outtype gives the same bits)")


def _run_export(args, results=None) -> dict:
    """``loramix export`` (or ``generate --format gguf`` on its ``results``): GGUF files written."""
    from loramix.mixing.gguf_export import export_gguf

    if results is None:
        p = export_gguf(args.adapter, args.out, base=args.base, outtype=args.outtype)
        _emit(args, {"adapter": args.adapter, "gguf": str(p)}, f"{p}: llama.cpp LoRA adapter (GGUF)")
        return {}
    return {str(r.out): str(export_gguf(r.out)) for r in results}


def _dask_options(args) -> dict | None:
    opts = {k: v for k, v in (("split", args.dask_split), ("parts", args.dask_parts),
                              ("connect_timeout", args.connect_timeout)) if v is not None}
    if opts and not args.scheduler:
        raise ValueError("--dask-split/--dask-parts/--connect-timeout are for a Dask batch; give --scheduler too")
    return opts or None


def _generate_special(args, progress: bool) -> bool:
    """``generate --from``: replay a recipe (True when handled); else check the usual arguments."""
    if args.recipe is None:
        missing = [n for n, v in (("DATASET", args.datasets), ("--bank", args.bank), ("-o/--out", args.out))
                   if not v]
        if missing:
            raise ValueError(f"generate needs {', '.join(missing)} (or --from OUT/loramix.json -o NEW)")
        return False
    if args.datasets or args.bank:
        raise ValueError("generate --from takes its datasets and bank from the recipe; give only -o/--out")
    if not args.out:
        raise ValueError("generate --from needs -o/--out (a new folder, or --overwrite)")
    from loramix.recipe import replay

    res, check = replay(args.recipe, args.out, overwrite=args.overwrite, progress=progress)
    same = {True: "identical to the original (SHA-256 of adapter_model.safetensors)",
            False: "DIFFERS from the original", None: "no checksum in the original to compare"}[check["identical"]]
    _emit(args, {**res.to_dict(), **check}, f"{res.out}: replayed {args.recipe}; {same}")
    return True


def _add_eval_demo(sub, common) -> None:
    ev = sub.add_parser("eval", help="evaluate generated adapters", parents=[common])
    esub = ev.add_subparsers(dest="eval_cmd", required=True)
    lo = esub.add_parser("leave-one-out", parents=[common],
                         help="hold out each task, generate its adapter from the rest, score on its test split")
    lo.add_argument("--bank", required=True, help="a mini-bank folder (base/ + bank/), a bank folder, or 'default' (the shipped mini bank)")
    lo.add_argument("--base", default=None, help="base model folder (default: BANK/base or next to the bank)")
    lo.add_argument("--tasks", nargs="+", default=None, help="held-out tasks (default: every task with a test split)")
    lo.add_argument("--out", default="loramix-loo", help="results folder; an interrupted run resumes there")
    lo.add_argument("--limit", type=int, default=48, help="test examples per task, the first N (0: all)")
    lo.add_argument("--split", default="test", help="scored split (valid: for tuning without the test split)")
    lo.add_argument("--pipelines", nargs="+", default=None, help="default: every registered pipeline")
    lo.add_argument("--metrics", nargs="+", default=None, help="default: every registered metric")
    lo.add_argument("--systems", nargs="+", default=None, help="only these systems (+ base and task-lora)")
    lo.add_argument("--temperature", type=float, default=1.0)
    lo.add_argument("--temperatures", type=float, nargs="+", default=(),
                    help="extra temperatures for the default pipeline and metric (systems normalized-js-T<t>)")
    lo.add_argument("--top-k", type=int, default=None)
    lo.add_argument("--protocol", default="loramix", choices=["loramix", "paper"],
                    help="paper: the held-out task's self-distance enters the row's mean/std (the paper's code)")
    lo.add_argument("--labels", default=None,
                    help="tasks.json (name, categories, sources): also leave out members sharing a source dataset")
    lo.add_argument("--max-new-tokens", type=int, default=24)
    lo.add_argument("--max-prompt-tokens", type=int, default=512)
    lo.add_argument("--batch-size", type=int, default=512, help="rows per generation batch (all systems share it)")
    lo.add_argument("--threads", type=int, default=None, help="torch threads")
    lo.add_argument("--keep-adapters", action="store_true", help="keep generated adapters in OUT/adapters")
    lo.add_argument("--neural-metrics", nargs="*", default=["js"],
                    help="feature sets of the neural systems, one system each ('js', 'js+cosine'; none: no "
                         "neural systems); combiners trained per fold without the held-out tasks")
    lo.add_argument("--neural-folds", type=int, default=6, help="K of the K-fold combiner training over tasks")
    lo.add_argument("--neural-seed", type=int, default=0, help="seed of the fold split and the combiners")
    lo.add_argument("--neural-hidden", type=int, default=16, help="hidden units of the fold combiners")
    rt = esub.add_parser("retrieval", parents=[common],
                         help="how well each metric x pipeline finds same-category tasks (profiles only, no adapters)")
    g = rt.add_mutually_exclusive_group(required=True)
    g.add_argument("--tasks", help="folder of task data files (<name>.jsonl ...)")
    g.add_argument("--bank", help="a bank folder (its members' stored profiles)")
    rt.add_argument("--labels", default=None,
                    help="tasks.json with name, categories, sources (default: TASKS/tasks.json or one folder up)")
    rt.add_argument("--tokenizer", default=None,
                    help="with --tasks: tokenizer.json or a folder (default: the shipped mini bank's)")
    rt.add_argument("--metrics", nargs="+", default=None, help="default: every histogram metric, cosine, instruction, hybrid")
    rt.add_argument("--pipelines", nargs="+", default=None, help="default: every row pipeline (not neural)")
    rt.add_argument("--temperature", type=float, default=None, help="for every pipeline (default: 1 and loramix's 0.25)")
    rt.add_argument("--top-k", type=int, default=None)
    rt.add_argument("--cap", type=int, default=None, help="examples embedded per dataset for metric cosine (default 1000)")
    rt.add_argument("--quantize", default=None, choices=["int8", "int8-all", "int8-block"], help="encoder for cosine/instruction")
    rt.add_argument("--encoder", default=None, help="a BERT-family encoder folder (default MiniLM)")
    rt.add_argument("--out", default=None, help="also write summary.json and table.md there")
    de = sub.add_parser("demo", parents=[common],
                        help="generate an adapter for a held-out task of the shipped mini bank")
    # defaults live in loramix.demo (not imported here: the CLI starts fast)
    de.add_argument("--task", default=None, help="held-out task (default: tail_tool_1)")
    de.add_argument("--out", default=None, help="adapter folder (default: ./loramix-demo-adapter)")
    de.add_argument("--overwrite", action="store_true", help="replace an existing output")
    de.add_argument("--no-eval", action="store_true", help="skip scoring (needs torch, transformers, peft)")
    de.add_argument("--examples", type=int, default=None, help="test examples scored (default: 24)")
    de.add_argument("--temperature", type=float, default=None,
                    help="softmin temperature (default: 0.25, tuned on the valid split)")
    de.add_argument("--top-k", type=int, default=None)
    de.add_argument("--bank-root", default=None, help="another mini bank (default: the shipped one)")


def _run_eval_demo(args, progress: bool) -> int:
    if args.cmd == "demo":
        from loramix.demo import run_demo

        opts = {k: v for k, v in (("out", args.out), ("examples", args.examples),
                                  ("temperature", args.temperature)) if v is not None}
        doc = run_demo(args.task, bank_root=args.bank_root, evaluate=not args.no_eval,
                       overwrite=args.overwrite, top_k=args.top_k,
                       echo=(lambda m: None) if args.json else print, **opts)
        if args.json:
            print(json.dumps(doc, indent=1, default=str))
        return 0
    if args.eval_cmd == "retrieval":
        return _run_retrieval(args)
    from loramix.evaluation.loo import leave_one_out, markdown_table

    log = None if args.quiet or args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    s = leave_one_out(args.bank, args.out, tasks=args.tasks, split=args.split, limit=args.limit or None,
                      temperatures=args.temperatures, base=args.base,
                      pipelines=args.pipelines, metrics=args.metrics, systems=args.systems,
                      temperature=args.temperature, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                      max_prompt_tokens=args.max_prompt_tokens, batch_size=args.batch_size,
                      threads=args.threads, keep_adapters=args.keep_adapters,
                      neural_metrics=args.neural_metrics, neural_folds=args.neural_folds,
                      neural_seed=args.neural_seed, neural_hidden=args.neural_hidden, protocol=args.protocol,
                      labels=args.labels, log=log)
    _emit(args, s, markdown_table(s) + f"\n\nresults in {args.out}/ (results.csv, table.md, summary.json)")
    return 0


def _run_retrieval(args) -> int:
    from loramix.evaluation import retrieval

    log = None if args.quiet or args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    eo = {k: v for k, v in (("cap", args.cap), ("quantize", args.quantize), ("encoder", args.encoder))
          if v is not None}
    if args.tasks:
        ts = retrieval.load_tasks(args.tasks, args.labels, tokenizer=args.tokenizer, embed_options=eo)
    else:
        if not args.labels:
            raise ValueError("eval retrieval --bank needs --labels tasks.json (categories and sources per member)")
        ts = retrieval.bank_tasks(args.bank, args.labels, embed_options=eo)
    s = retrieval.evaluate_retrieval(ts, metrics=args.metrics, pipelines=args.pipelines,
                                     temperature=args.temperature, top_k=args.top_k,
                                     default_system=args.temperature is None and args.top_k is None, log=log)
    text = retrieval.markdown_table(s)
    if args.out:
        retrieval.write_summary(s, args.out)
        text += f"\n\nresults in {args.out}/ (summary.json, table.md)"
    _emit(args, s, text)
    return 0


def _emit(args, doc: dict, text: str) -> None:
    if args.json:
        print(json.dumps(doc, indent=1, default=str))
    else:
        print(text)


def _run(args) -> int:
    progress = not args.quiet and not args.json and sys.stderr.isatty()
    if args.cmd in ("eval", "demo"):
        return _run_eval_demo(args, progress)
    if args.cmd == "bank":
        from loramix.bank import bank as bankmod

        if args.bank_cmd == "build":
            doc = bankmod.build_bank(args.dir, args.tokenizer, fields=args.fields,
                                     base_model=args.base_model, split=args.split, progress=progress)
            _emit(args, {"bank": args.dir, "members": [m["name"] for m in doc["members"]],
                         "base_model": doc["base_model"], "bank_hash": doc["bank_hash"]},
                  f"bank {args.dir}: {len(doc['members'])} members, base model {doc['base_model']}, "
                  f"hash {doc['bank_hash'][:12]}")
            if args.embeddings:
                from loramix.profiles import embeddings as semantic

                semantic.bank_embeddings(bankmod.Bank.open(args.dir), encoder=args.encoder, quantize=args.quantize,
                                         **({"cap": args.cap} if args.cap is not None else {}))
        elif args.bank_cmd == "verify":
            from loramix.bank import integrity

            b = bankmod.Bank.open(args.dir)
            bad = integrity.verify(b)
            if bad:
                raise bankmod.BankError(f"bank {args.dir}: " + "; ".join(bad))
            _emit(args, {"bank": args.dir, "members": len(b.members), "ok": True},
                  f"bank {args.dir}: {len(b.members)} members match the hashes recorded at build")
        elif args.bank_cmd == "train-combiner":
            from loramix.weights import neural

            s = neural.train_bank_combiner(args.dir, args.metric, cosine=args.cosine, space=args.space,
                                           hidden=args.hidden, encoder=args.encoder, quantize=args.quantize,
                                           seed=args.seed, max_epochs=args.max_epochs)
            _emit(args, s, f"{s['combiner']}: features {', '.join(s['features'])}; {s['epochs']} epochs, best "
                  f"{s['best_epoch']}: train loss {s['best_train_loss']:.4g}, val loss {s['best_val_loss']:.4g} "
                  f"(normalized pipeline {s['normalized_val_loss']:.4g})")
        elif args.bank_cmd == "pull":
            from loramix.bank import hub

            recs = hub.pull(args.repo_ids, args.to, datasets=args.dataset, cache_dir=args.cache_dir,
                            revision=args.revision, with_datasets=not args.no_datasets, progress=progress)
            doc = {"to": args.to, "members": recs}
            if args.tokenizer:
                b = bankmod.build_bank(args.to, args.tokenizer, progress=progress)
                doc["bank_hash"] = b["bank_hash"]
            _emit(args, doc, "\n".join(f"{r['name']}: {r['adapter']}"
                                       + (f" + {r['dataset']}" if r["dataset"] else "") for r in recs))
        else:
            from loramix.weights import neural

            b = bankmod.Bank.open(args.dir)
            s = {**b.summary(), **neural.combiner_status(b)}
            _emit(args, s, "\n".join(f"{k}: {v}" for k, v in s.items() if k != "member_names")
                  + "\nmembers: " + ", ".join(s["member_names"]))
    elif args.cmd == "profile":
        from loramix.profiles import tokens as prof
        from loramix.bank.bank import Bank

        if args.bank:
            b = Bank.open(args.bank)
            tok, fields = b.tokenizer_path, args.fields or b.fields
        else:
            tok, fields = args.tokenizer, args.fields or ("input", "output")
        prof.Profile.check_target(args.out)   # before tokenizing: never over a user's file
        p = prof.build_profile(args.dataset, tok, fields=fields, split=args.split, progress=progress)
        p.save(args.out)
        _emit(args, {"out": args.out, "n_examples": p.n_examples, "n_tokens": p.n_tokens,
                     "distinct_tokens": int(p.ids.size), "tokenizer_sha256": p.tokenizer_hash,
                     "dataset_sha256": p.dataset_hash},
              f"{args.out}: {p.n_examples} examples, {p.n_tokens} tokens ({p.ids.size} distinct)")
    elif args.cmd == "generate":
        from loramix.pipeline import generate

        if _generate_special(args, progress):
            return 0
        many = len(args.datasets) > 1
        res = generate(args.datasets if many else args.datasets[0], args.bank, args.out,
                       pipeline=args.pipeline, metric=args.metric, mode=args.mode, top_k=args.top_k,
                       temperature=args.temperature, dtype=args.dtype, rank=args.rank, verify=args.verify,
                       exclude=args.exclude, leave_one_out=args.leave_one_out, fields=args.fields, split=args.split,
                       overwrite=args.overwrite, profile_cache=args.profile_cache, progress=progress,
                       scheduler=args.scheduler, protocol=args.protocol,
                       metric_options={k: v for k, v in (("encoder", args.encoder), ("quantize", args.quantize),
                                                         ("cap", args.cap)) if v is not None},
                       pipeline_options={"combiner": args.combiner} if args.combiner else None,
                       base_model=args.base_model, distributed_options=_dask_options(args))
        res = res if many else [res]
        docs = [r.to_dict() for r in res]
        if args.format == "gguf":
            ggufs = _run_export(args, res)
            for d in docs:
                d["gguf"] = ggufs[d["out"]]
        _emit(args, {"adapters": docs} if many else docs[0],
              "\n".join(f"{r.out}: " + ", ".join(f"{m} {w:.3f}" for m, w in r.top(5))
                        + (" (skipped: already there, verified)" if r.status == "skipped" else "")
                        + (f"\n  gguf: {d['gguf']}" if d.get("gguf") else "") for r, d in zip(res, docs)))
    elif args.cmd == "explain":
        from loramix.explain import explain

        s = explain(args.out, png=True if args.png == "" else args.png, top=args.top)
        _emit(args, {k: v for k, v in s.items() if k != "text"},
              s["text"] + (f"\nchart: {s['png']}" if s.get("png") else ""))
    elif args.cmd == "export":
        _run_export(args)
    elif args.cmd == "bench":
        return _run_bench(args.bench_args)
    return 0


def find_benches() -> Path | None:
    """The ``benches/`` folder holding the harness (``loramix_bench``): ``$LORAMIX_BENCHES``, else
    the current folder or one above it, else the source tree this loramix was imported from."""
    cands = [os.environ.get("LORAMIX_BENCHES")]
    cwd = Path.cwd().resolve()
    cands += [str(d / "benches") for d in (cwd, *cwd.parents)]
    cands.append(str(Path(__file__).resolve().parents[2] / "benches"))
    for c in cands:
        if c and (Path(c) / "loramix_bench" / "__init__.py").is_file():
            return Path(c)
    return None


def _run_bench(argv: list[str]) -> int:
    """``loramix bench``: the benchmark harness is not part of the installed library (it compares
    with peers and needs their packages); it runs from a source checkout's ``benches/``."""
    where = find_benches()
    if where is None:
        raise SystemExit("loramix: error: loramix bench runs the harness in benches/ of a loramix source "
                         "checkout; run it from inside the checkout (or set LORAMIX_BENCHES=/path/to/benches), "
                         "with the peers installed: pip install '.[bench]'")
    sys.path.insert(0, str(where))
    import loramix_bench

    return loramix_bench.main(argv)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"loramix: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:   # the harness parses its own arguments (benches/loramix_bench)
        return _run_bench(argv[1:])
    from loramix import cliutil

    parser = _parser()
    parser.json_errors = cliutil.json_wanted(argv)
    args = parser.parse_args(argv)
    if args.debug:
        return _run(args)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            return _run(args)
    except KeyboardInterrupt:
        if args.json:
            cliutil.print_json_error("interrupted", "KeyboardInterrupt", 130)
        print("loramix: error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, TypeError, RuntimeError, ImportError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        if args.json:
            cliutil.print_json_error(msg, type(e).__name__, 1)
        print(f"loramix: error: {msg}", file=sys.stderr)
        return 1
    except SystemExit as e:   # a command that stops with a message (e.g. bench without a checkout)
        if args.json and isinstance(e.code, str):
            cliutil.print_json_error(e.code.removeprefix("loramix: error: "), "SystemExit", 1)
        raise


if __name__ == "__main__":
    sys.exit(main())
