"""The ``loramix`` command line.

    loramix bank build DIR --tokenizer PATH      profile the members, write DIR/bank.json
    loramix bank pull REPO_ID... --to DIR        download adapters (+ datasets) from the Hub
    loramix bank info DIR                        what a bank holds
    loramix profile DATASET --bank DIR -o F.npz  a dataset's token profile
    loramix generate DATASET... --bank DIR -o OUT
    loramix explain OUT                          top contributors + a PNG bar chart
    loramix bench [--scale laptop|paper] [--suite kernels|mix|e2e|all]   speed/memory vs peers

Errors end with a one-line ``loramix: error: ...`` and a non-zero exit (``--debug`` shows the
traceback). ``--json`` prints one JSON document on stdout for scripts; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings


def _fields(s: str) -> tuple:
    return tuple(f.strip() for f in s.split(",") if f.strip())


def _parser() -> argparse.ArgumentParser:
    def flags(default):
        c = argparse.ArgumentParser(add_help=False)
        c.add_argument("--json", action="store_true", default=default, help="print a JSON document for scripts")
        c.add_argument("--debug", action="store_true", default=default, help="show tracebacks on errors")
        c.add_argument("--quiet", "-q", action="store_true", default=default, help="no progress bars")
        return c

    # the flags work before or after the subcommand: below it they do not reset what was given above
    top, common = flags(False), flags(argparse.SUPPRESS)
    p = argparse.ArgumentParser(prog="loramix", parents=[top],
                                description="LoRA adapters for a new dataset from a bank, on a CPU.")
    sub = p.add_subparsers(dest="cmd", required=True)

    bank = sub.add_parser("bank", help="build, pull or inspect a bank", parents=[common])
    bsub = bank.add_subparsers(dest="bank_cmd", required=True)
    b = bsub.add_parser("build", help="profile members and write bank.json", parents=[common])
    b.add_argument("dir")
    b.add_argument("--tokenizer", required=True, help="tokenizer.json or a folder holding it")
    b.add_argument("--fields", type=_fields, default=("input", "output"), help="text fields, comma-separated")
    b.add_argument("--base-model", default=None, help="the bank's base model (default: most members')")
    b.add_argument("--split", default="train")
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

    pr = sub.add_parser("profile", help="a dataset's token profile (.npz)", parents=[common])
    pr.add_argument("dataset")
    g = pr.add_mutually_exclusive_group(required=True)
    g.add_argument("--bank", help="use the bank's tokenizer")
    g.add_argument("--tokenizer", help="tokenizer.json or a folder holding it")
    pr.add_argument("-o", "--out", required=True)
    pr.add_argument("--fields", type=_fields, default=None)
    pr.add_argument("--split", default="train")

    ge = sub.add_parser("generate", help="generate adapter(s) for dataset(s)", parents=[common])
    ge.add_argument("datasets", nargs="+", help="dataset files/folders or saved profiles (.npz)")
    ge.add_argument("--bank", required=True, help="bank folder (with bank.json)")
    ge.add_argument("-o", "--out", required=True,
                    help="output adapter folder (with several datasets: a folder of adapters)")
    ge.add_argument("--pipeline", default="normalized",
                    help="attentional | normalized (the paper's best) | any registered pipeline")
    ge.add_argument("--metric", default="js", help="js | kl | wd | mmd | any registered metric")
    ge.add_argument("--mode", default="factors", choices=["factors", "concat", "svd"])
    ge.add_argument("--top-k", type=int, default=None, help="keep the k nearest members, renormalized")
    ge.add_argument("--temperature", type=float, default=1.0, help="softmin temperature")
    ge.add_argument("--rank", type=int, default=None, help="svd mode: output rank (default: the bank's)")
    ge.add_argument("--dtype", default=None, help="f32, f16 or bf16 (default: the bank's)")
    ge.add_argument("--exclude", action="append", default=[], help="member to leave out (repeatable)")
    ge.add_argument("--leave-one-out", action="store_true",
                    help="leave out members trained on the very same data (same content hash)")
    ge.add_argument("--fields", type=_fields, default=None)
    ge.add_argument("--split", default="train")
    ge.add_argument("--profile-cache", default=None, help="folder to keep query profiles in")
    ge.add_argument("--overwrite", action="store_true", help="replace an existing output (atomically)")

    ex = sub.add_parser("explain", help="top contributors of a generated adapter", parents=[common])
    ex.add_argument("out")
    ex.add_argument("--png", default=None, help="bar chart path (default: OUT/weights.png)")
    ex.add_argument("--top", type=int, default=10)

    from .bench import add_arguments as _bench_arguments   # cheap: argparse only
    _bench_arguments(sub.add_parser("bench", help="speed and memory vs peers (synthetic paper-scale bank)",
                                    parents=[common]))
    return p


def _emit(args, doc: dict, text: str) -> None:
    if args.json:
        print(json.dumps(doc, indent=1, default=str))
    else:
        print(text)


def _run(args) -> int:
    progress = not args.quiet and not args.json and sys.stderr.isatty()
    if args.cmd == "bank":
        from . import bank as bankmod

        if args.bank_cmd == "build":
            doc = bankmod.build_bank(args.dir, args.tokenizer, fields=args.fields,
                                     base_model=args.base_model, split=args.split, progress=progress)
            _emit(args, {"bank": args.dir, "members": [m["name"] for m in doc["members"]],
                         "base_model": doc["base_model"], "bank_hash": doc["bank_hash"]},
                  f"bank {args.dir}: {len(doc['members'])} members, base model {doc['base_model']}, "
                  f"hash {doc['bank_hash'][:12]}")
        elif args.bank_cmd == "pull":
            from . import hub

            recs = hub.pull(args.repo_ids, args.to, datasets=args.dataset, cache_dir=args.cache_dir,
                            revision=args.revision, with_datasets=not args.no_datasets, progress=progress)
            doc = {"to": args.to, "members": recs}
            if args.tokenizer:
                b = bankmod.build_bank(args.to, args.tokenizer, progress=progress)
                doc["bank_hash"] = b["bank_hash"]
            _emit(args, doc, "\n".join(f"{r['name']}: {r['adapter']}"
                                       + (f" + {r['dataset']}" if r["dataset"] else "") for r in recs))
        else:
            s = bankmod.Bank.open(args.dir).summary()
            _emit(args, s, "\n".join(f"{k}: {v}" for k, v in s.items() if k != "member_names")
                  + "\nmembers: " + ", ".join(s["member_names"]))
    elif args.cmd == "profile":
        from . import profile as prof
        from .bank import Bank

        if args.bank:
            b = Bank.open(args.bank)
            tok, fields = b.tokenizer_path, args.fields or b.fields
        else:
            tok, fields = args.tokenizer, args.fields or ("input", "output")
        p = prof.build_profile(args.dataset, tok, fields=fields, split=args.split, progress=progress)
        p.save(args.out)
        _emit(args, {"out": args.out, "n_examples": p.n_examples, "n_tokens": p.n_tokens,
                     "distinct_tokens": int(p.ids.size), "tokenizer_sha256": p.tokenizer_hash,
                     "dataset_sha256": p.dataset_hash},
              f"{args.out}: {p.n_examples} examples, {p.n_tokens} tokens ({p.ids.size} distinct)")
    elif args.cmd == "generate":
        from .generate import generate

        many = len(args.datasets) > 1
        res = generate(args.datasets if many else args.datasets[0], args.bank, args.out,
                       pipeline=args.pipeline, metric=args.metric, mode=args.mode, top_k=args.top_k,
                       temperature=args.temperature, dtype=args.dtype, rank=args.rank,
                       exclude=args.exclude, leave_one_out=args.leave_one_out, fields=args.fields, split=args.split,
                       overwrite=args.overwrite, profile_cache=args.profile_cache, progress=progress)
        res = res if many else [res]
        docs = [r.to_dict() for r in res]
        _emit(args, {"adapters": docs} if many else docs[0],
              "\n".join(f"{r.out}: " + ", ".join(f"{m} {w:.3f}" for m, w in r.top(5)) for r in res))
    elif args.cmd == "explain":
        from .explain import explain

        s = explain(args.out, png=args.png, top=args.top)
        _emit(args, {k: v for k, v in s.items() if k != "text"}, s["text"] + f"\nchart: {s['png']}")
    elif args.cmd == "bench":
        from .bench import run as bench_run

        return bench_run(args)
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"loramix: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.debug:
        return _run(args)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            return _run(args)
    except KeyboardInterrupt:
        print("loramix: error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, TypeError, RuntimeError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"loramix: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
