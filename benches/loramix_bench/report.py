"""Tables (markdown, printed and written to ``out/bench.md``) and PNG plots of a bench run."""
from __future__ import annotations

from pathlib import Path

MB = 2**20


def _f(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if x != x:   # NaN
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{nd}g}"


def _table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _mb(b):
    return "-" if b is None else f"{b / MB:,.0f}"


def _cases(doc, suite):
    return doc["suites"].get(suite, {}).get("cases", [])


def tables(doc: dict) -> str:

    parts = []
    m = doc["machine"]
    parts.append(f"Machine: {m.get('Model name')}, {m.get('cores')} cores, {m.get('ram_gb')} GiB RAM; "
                 f"loramix ISAs {m['loramix']['available']} (active {m['loramix']['active']}); "
                 f"numpy {m.get('numpy')} BLAS {m.get('blas')}; env {m.get('env')}. "
                 f"Scale {doc['scale']} (N={doc['n']}), started {doc['started']}.")
    ce = _cases(doc, "ceilings")
    if ce:
        rows = []
        for c in ce:
            val = c.get("gb_per_s") or c.get("gflop_per_s")
            unit = "GB/s" if "gb_per_s" in c else "GFLOP/s"
            extra = c.get("blas") or c.get("config") or ""
            if c.get("u64_max_gb_per_s"):
                extra = f"same bytes as uint64 max: {c['u64_max_gb_per_s']:.2f} GB/s"
            if c.get("first_gb_per_s"):
                extra = f"{c['bytes'] / 1e9:.1f} GB; uint64 max; first pass (mapping the pages) {c['first_gb_per_s']:.2f} GB/s"
            rows.append([c["label"], _f(c.get("median_s")), f"{_f(val)} {unit}", str(extra)[:90] if not c.get("error") else c["error"]])
        parts.append("### Machine ceilings (same run)\n\n" + _table(["measure", "median s", "best rate", "kernel"], rows))
    pr = doc.get("probes") or []
    if pr:
        import statistics

        rows = []
        for kind, unit in (("read", "GB/s"), ("gemm", "GFLOP/s")):
            v = [p["value"] for p in pr if p["kind"] == kind]
            if v:
                rows.append([kind, len(v), f"{statistics.median(v):.2f} {unit}", f"{min(v):.2f}-{max(v):.2f}",
                             f"{min(p['loadavg'] for p in pr if p['kind'] == kind):.1f}-"
                             f"{max(p['loadavg'] for p in pr if p['kind'] == kind):.1f}"])
        parts.append("### Ceilings interleaved with the cases (probes in the harness process before and after "
                     "each case; a case's ratio uses the mean of its two probes)\n\n"
                     + _table(["ceiling", "probes", "median", "range", "1-min load avg"], rows))
    dm = doc["suites"].get("kernels", {}).get("distance_matrix")
    if dm:
        rows = [[r["method"], _f(r["seconds"], 4), _f(r["pairs_per_s"]), _f(r["x_slower_than_best_loramix"]),
                 f"{r['max_rel_err']:.2e}" if r["max_rel_err"] == r["max_rel_err"] else "-", r["note"]]
                for r in dm["rows"]]
        parts.append(f"### Distance matrix: all {dm['pairs']:,} JS pairs of {dm['n']} profiles, V={dm['V']:,} "
                     f"({dm['nnz_min']}-{dm['nnz_max']} distinct tokens each)"
                     + (f", from `{dm['source']}`" if dm.get("source") else "") + "\n\n"
                     + _table(["method", "seconds", "pairs/s", "x best loramix", "max rel err vs f64", "note"], rows)
                     + (f"\n\n{dm['simsimd_note']}" if dm.get("simsimd_note") else ""))
    ws = doc["suites"].get("kernels", {}).get("wsum")
    if ws:
        rows = [[r["variant"], _f(r["seconds"], 4), _f(r["gb_per_s"]), _f(r.get("gflop_per_s"))] for r in ws["rows"]]
        parts.append(f"### weighted_sum kernel (`benches/bench_wsum.py`: K={ws['k']} bf16 sources of P={ws['p']:,}; "
                     f"batched Q={ws['q']})\n\n" + _table(["variant", "s", "GB/s read", "GFLOP/s"], rows))
    mx = doc["suites"].get("mix", {})
    if mx:
        bw = max((c.get("gb_per_s", 0) for c in ce if c["spec"]["case"] == "ceiling_read"), default=float("nan"))
        one = [c for c in mx.get("cases", []) if c["spec"]["case"] in ("loramix_mix", "paper_matmul", "peft_mix")]
        ref = {}
        for c in one:
            if c["spec"]["case"] == "loramix_mix" and "error" not in c:
                ref[(c["spec"]["mode"], c["spec"].get("top_k"))] = c["median_s"] / max(1, c["members_read"])
        rows = []
        for c in one:
            sp = c["spec"]
            if "error" in c:
                rows.append([c["label"], "-", "-", "-", "-", "-", "-", "-", c.get("capped") or c["error"][:80]])
                continue
            if sp["case"] == "loramix_mix":
                n_used = c["members_read"]
                vs = ""
            else:
                n_used = sp["n"]
                mode = {"paper_matmul": "factors", "peft_mix": {"linear": "factors", "cat": "concat",
                                                                   "svd": "svd"}.get(sp.get("combination"))}[sp["case"]]
                per = c["median_s"] / n_used
                if sp["case"] == "peft_mix" and c.get("layers") and c["layers"] < 32:
                    per *= 32 / c["layers"]
                r0 = ref.get((mode, None))
                vs = f"{per / r0:.1f}x slower per member than loramix {mode}" if r0 else ""
            gbs = c.get("gb_per_s") or (c.get("bytes_read", 0) / c["median_s"] / 1e9 if c.get("median_s") else None)
            cbw = (c.get("ceiling") or {}).get("value", bw)
            frac = f"{100 * gbs / cbw:.0f}% of {cbw:.1f}" if gbs and cbw == cbw else "-"
            note = []
            if c.get("load_s") is not None:
                note.append(f"load {c['load_s']:.1f} s")
            if c.get("layers") and c["layers"] < 32:
                note.append(f"{c['layers']} of 32 layers")
            if c.get("first_s") is not None:
                note.append(f"first run in process {c['first_s']:.2f} s")
            if c.get("minor_faults_per_run") is not None:
                note.append(f"{c['minor_faults_per_run']:,.0f} minor faults/run, sys {c['sys_s_per_run']:.2f} s")
            rows.append([c["label"], n_used, _f(c["median_s"]), _f(gbs), frac, _mb(c.get("peak_rss")),
                         _mb(c.get("peak_anon")), vs, ", ".join(note)])
        for k, v in mx.items():
            if isinstance(v, dict) and "skipped" in v:
                rows.append([k, "-", "-", "-", "-", "-", "-", "", f"skipped: {v['skipped']}; {v['predicted']}"])
        parts.append("### One adapter from the bank (median seconds; GB/s of bank tensors read; "
                     "% of the read bandwidth probed right before and after the case, GB/s; "
                     "peak RSS = VmHWM of a fresh process, anon = sampled peak RssAnon, MB)\n\n"
                     + _table(["case", "members", "median s", "GB/s", "% read BW", "peak RSS", "peak anon",
                               "ratio", "note"], rows))
        fits = [f"{k}: {v}" for k, v in mx.items() if k.endswith("_fit")]
        if fits:
            parts.append("In-RAM peers, memory prediction: " + "; ".join(fits))
        gemm = max((c.get("gflop_per_s", 0) for c in ce if c["spec"]["case"] == "ceiling_gemm"), default=float("nan"))
        loo = [c for c in mx.get("cases", []) if c["spec"]["case"] in ("loramix_loo", "loramix_loo_kernel", "torch_loo")]
        rows = []
        tl = next((c.get("gflop_per_s") for c in loo if c["spec"]["case"] == "torch_loo" and "error" not in c), None)
        for c in loo:
            if "error" in c:
                rows.append([c["label"], "-", "-", "-", "-", "-", "-", c["error"][:80]])
                continue
            g = c.get("gflop_per_s")
            cg = (c.get("ceiling") or {}).get("value", gemm)
            rows.append([c["label"], f"{c['Q']}x{c['K']}x{c['P']:,}", _f(c["median_s"]), _f(g),
                         f"{100 * g / cg:.0f}% of {cg:.0f}" if cg == cg else "-",
                         f"{g / tl:.2f}x" if tl else "-", _mb(c.get("peak_rss")),
                         f"load {c['load_s']:.1f} s" if c.get("load_s") else ""])
        if rows:
            parts.append("### Leave-one-out: Q adapters in one pass (GFLOP/s; % of the fp32 2048^3 GEMM probed "
                         "right before and after the case)\n\n"
                         + _table(["case", "Q x K x P", "median s", "GFLOP/s", "% GEMM", "x torch.matmul",
                                   "peak RSS MB", "note"], rows))
    fp = doc["suites"].get("fp32", {})
    if fp.get("cases"):
        rows = [[c["label"], _f(c.get("median_s")), _f(c.get("gb_per_s")), _mb(c.get("peak_rss")),
                 _mb(c.get("peak_anon")), c.get("error", "")] for c in fp["cases"]]
        parts.append(f"### fp32 bank as published ({_f(fp.get('bank_gb'))} GB)\n\n"
                     + _table(["case", "s", "GB/s", "peak RSS MB", "peak anon MB", ""], rows)
                     + (f"\n\nPaper approach at this N: {fp.get('paper_fit')}" if fp.get("paper_fit") else ""))
    e2e = doc["suites"].get("e2e", {})
    if e2e:
        rows = []
        for k, what in (("warm", "1 dataset vs all N"), ("top16", "1 dataset, --top-k 16"),
                        ("batch16", "16 datasets in one call"), ("cold", "1 dataset vs all N, cold cache")):
            v = e2e.get(k)
            if v:
                extra = (f"cpu {v['cpu_s']:.2f} s, sys {v['sys_s']:.2f} s, {v['minor_faults']:,} minor / "
                         f"{v['major_faults']:,} major faults")
                if k == "cold":
                    extra += f"; cold sequential read of the same files {v['cold_read_s']:.2f} s"
                rows.append([what, _f(v["median_s"]), _f(v["min_s"]), v["runs"], _mb(v["peak_rss"]),
                             extra + (f"; ERROR {v['error']}" if v.get("error") else "")])
        st = _cases(doc, "e2e")
        stages = ""
        if st and "stages_median_s" in st[0]:
            s_ = st[0]["stages_median_s"]
            stages = ("\n\nStages in-process (warm, median): " + ", ".join(f"{k} {v:.3f} s" for k, v in s_.items())
                      + f"; total {st[0]['total_median_s']:.3f} s; peak RSS {_mb(st[0]['peak_rss'])} MB "
                        f"(anon {_mb(st[0]['peak_anon'])} MB). Python start + imports: "
                        f"{e2e.get('python_import_s', float('nan')):.2f} s.")
        parts.append(f"### End to end: `{e2e.get('command')}` (a fresh CLI process per run; the three warm "
                     "commands alternate, with read-bandwidth probes between rounds)\n\n"
                     + _table(["run", "median s", "min s", "runs", "peak RSS MB", "how"], rows) + stages)
    cb = doc["suites"].get("kernels", {}).get("combiner")
    if cb and "training" in cb:
        rows = [[r["hidden"], _f(r.get("process_first_s", r["seconds"])), _f(r["seconds"]), _f(r.get("cpu_s")),
                 r["epochs"],
                 _f(r["ms_per_epoch"]), f"{r['val_loss']:.4f}", f"{r['normalized_T1_val_loss']:.4f}"]
                for r in cb["training"]]
        parts.append(f"### Neural combiner, {cb['members']} members (`benches/bench_combiner.py`, a fresh "
                     f"process: {_f(cb.get('process_wall_s'))} s in all, of which imports "
                     f"{_f(cb.get('import_s'))} s, Gram {_f(cb.get('factor_gram_s'))} s)\n\n"
                     + _table(["hidden", "imports + first training s", "training s", "training CPU s", "epochs",
                               "ms/epoch",
                               "val loss", "normalized val loss"], rows))
    return "\n\n".join(parts) + "\n"


def plots(doc: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    dm = doc["suites"].get("kernels", {}).get("distance_matrix")
    if dm:
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(dm["rows"]) + 1.2))
        names = [r["method"] for r in dm["rows"]]
        ax.barh(names, [r["seconds"] for r in dm["rows"]],
                color=["C0" if n.startswith("loramix") else "C1" for n in names])
        ax.set_xscale("log")
        ax.set_xlabel("seconds for all pairs (log)")
        ax.set_title(f"JS distance matrix, N={dm['n']}")
        ax.invert_yaxis()
        fig.tight_layout()
        p = out / "kernels.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    mx = [c for c in doc["suites"].get("mix", {}).get("cases", [])
          if ("error" not in c and "median_s" in c) or c.get("capped")]
    if mx:
        from matplotlib.ticker import LogLocator, NullFormatter

        cap = doc.get("args", {}).get("svd_timeout") or 0
        fig, axs = plt.subplots(1, 2, figsize=(13, 0.35 * len(mx) + 1.7))
        names = [c["label"] + (" (capped)" if c.get("capped") else "") for c in mx]
        cols = ["C0" if n.startswith("loramix") else "C1" for n in names]
        bars = axs[0].barh(names, [cap if c.get("capped") else c["median_s"] for c in mx], color=cols)
        for b, c in zip(bars, mx):
            if c.get("capped"):
                b.set_hatch("//")
                b.set_alpha(0.5)
        axs[0].set_xscale("log")
        axs[0].set_xlabel(f"median seconds (log; hatched: stopped at the {cap:.0f} s svd cap)")
        axs[1].barh(names, [c.get("peak_rss", 0) / MB for c in mx], color=cols)
        axs[1].axvline(512, color="k", ls="--", lw=1)
        axs[1].set_xscale("log")
        axs[1].set_xlabel("peak RSS MB (log), 512 MB goal dashed")
        axs[1].set_yticks([])
        for a in axs:
            a.invert_yaxis()
            a.xaxis.set_minor_locator(LogLocator(subs="all"))
            a.xaxis.set_minor_formatter(NullFormatter())
        loads = [x["loadavg_1_5_15"][0] for x in doc.get("load", [])] + [x["loadavg"] for x in doc.get("probes", [])]
        load = f", 1-min load {min(loads):.0f}-{max(loads):.0f} on {doc['machine'].get('cores')} cores" if loads else ""
        fig.suptitle(f"loramix bench mix suite, N={doc['n']} (loramix blue, peers orange), "
                     f"{doc['started'][:10]}{load}")
        fig.tight_layout()
        p = out / "mix.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    st = doc["suites"].get("e2e", {}).get("cases", [])
    if st and "stages_median_s" in st[0]:
        s = st[0]["stages_median_s"]
        fig, ax = plt.subplots(figsize=(8, 2))
        left = 0.0
        for i, (k, v) in enumerate((k, v) for k, v in s.items() if not k.startswith("(")):
            ax.barh(["generate"], [v], left=left, label=k, color=f"C{i}")
            left += v
        ax.set_xlabel("seconds (warm, in-process)")
        ax.legend(ncol=6, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 1.45))
        fig.tight_layout()
        p = out / "e2e.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    return made


def goals(doc: dict) -> str:
    """Issue 11's goals against this run's numbers, one row each: the bound, the measured value and
    their ratio, written so that <= 1 means met (measured / bound for upper bounds, bound / measured
    for lower bounds)."""
    rows = []

    def add(goal, bound, measured, ratio, note="", ratio_text=None):
        ok = ratio == ratio and ratio <= 1.0
        rows.append([goal, bound, measured, ratio_text or (f"{ratio:.2f}" if ratio == ratio else "-"),
                     ("met" if ok else "MISSED") if ratio == ratio else "not measured", note])

    mix = {c["label"]: c for c in _cases(doc, "mix") + _cases(doc, "fp32")}
    e2e = doc["suites"].get("e2e", {})
    st = next(iter(_cases(doc, "e2e")), {})
    stages = st.get("stages_median_s", {})
    warm, cold, top, batch = (e2e.get(k) for k in ("warm", "cold", "top16", "batch16"))
    n = doc.get("n")
    if warm:
        read_s = warm["bank_tensor_bytes"] / (warm["read_gbs"] * 1e9)
        bound = 2.5 * read_s + 0.3
        add("1. one adapter end to end, warm (CLI, fresh process)", f"2.5 x {read_s:.3f} s read + 0.3 = {bound:.2f} s",
            f"{warm['median_s']:.2f} s", warm["median_s"] / bound, f"read at {warm['read_gbs']:.1f} GB/s (probes)")
    if cold:
        add("1. one adapter end to end, cold page cache", f"1.2 x cold sequential read {cold['cold_read_s']:.2f} s",
            f"{cold['median_s']:.2f} s", cold["median_s"] / (1.2 * cold["cold_read_s"]))
    lm = [c for c in list(mix.values()) + ([st] if st else []) if "error" not in c and "peak_rss" in c
          and (c["spec"]["case"].startswith("loramix") or c["spec"]["case"] == "e2e_breakdown")]
    cli = [v for v in (warm, cold, top, batch) if v]
    if lm or cli:
        worst = max([c["peak_rss"] for c in lm] + [v["peak_rss"] for v in cli])
        add("2. VmHWM, every loramix case and CLI run", "512 MB", f"{_mb(worst)} MB", worst / (512 * MB))
    if lm:
        anon = max(c.get("peak_anon", 0) for c in lm)
        add("2. RssAnon, every loramix case", "300 MB", f"{_mb(anon)} MB", anon / (300 * MB))
    if "open" in stages:
        add("3. open the bank", "0.050 s", f"{stages['open']:.3f} s", stages["open"] / 0.05, f"N={n}")
    fa = mix.get("loramix factors, top-k all")
    if fa and "error" not in fa:
        cbw = (fa.get("ceiling") or {}).get("value", float("nan"))
        add("4. factors mix through files, all N", "70% of read BW", f"{fa['gb_per_s']:.2f} GB/s of {cbw:.2f}",
            0.7 * cbw / fa["gb_per_s"])
    if warm and top:
        x = warm["median_s"] / top["median_s"]
        add(f"4. top-16 end to end vs all {n}", ">= 10x faster", f"{x:.1f}x", 10.0 / x,
            f"{warm['median_s']:.2f} s / {top['median_s']:.2f} s")
    for label, bound in (("loramix svd, top-k 16", 5.0), ("loramix svd, top-k all", 60.0)):
        c = mix.get(label)
        if c is None:
            continue
        scope = "paper scale" if "16" in label else "all 64 of the laptop bank"
        if "error" in c:
            cap = doc.get("args", {}).get("svd_timeout") or float("nan")
            add(f"5. svd, {label.split(', ')[1]} ({scope})", f"{bound:.0f} s",
                f"> {cap:.0f} s (capped, N={n})" if c.get("capped") else c["error"][:60],
                cap / bound if c.get("capped") and cap >= bound else float("nan"),   # a cap below the bound: unknown
                "stopped at --svd-timeout; --svd-timeout 0 lifts the cap",
                ratio_text=f"> {cap / bound:.2f}" if c.get("capped") else None)
        else:
            add(f"5. svd, {label.split(', ')[1]} ({scope})", f"{bound:.0f} s",
                f"{c['median_s']:.2f} s (N={n})", c["median_s"] / bound,
                "" if (n == 502) == ("16" in label) else "measured at another N than the goal's")
    if warm and batch:
        x = batch["median_s"] / warm["median_s"]
        add("6. 16 datasets in one call vs 1", "<= 1.5x", f"{x:.2f}x", x / 1.5,
            f"{batch['median_s']:.2f} s / {warm['median_s']:.2f} s")
    dm = doc["suites"].get("kernels", {}).get("distance_matrix")
    jf = doc["suites"].get("kernels", {}).get("js_floor")
    if jf:
        x = jf["all_pairs_s"] / jf["log_floor_s"]
        xc = jf["all_pairs_cpu_s"] / jf["log_floor_cpu_s"]
        add(f"7. JS {jf['n']}x{jf['n']} vs the log floor (tools/js_floor.py)", "<= 2x",
            f"{x:.2f}x wall ({jf['all_pairs_s']:.3f} s / {jf['log_floor_s']:.3f} s), {xc:.2f}x CPU", x / 2.0,
            f"interleaved, {jf['rounds']} rounds, load {jf['load_avg_1min'][0]:.1f}-{jf['load_avg_1min'][1]:.1f}")
        add(f"7. 1x{jf['n']} JS against the prepared bank (what generate maps from bank.index)", "10 ms",
            f"{1e3 * jf['one_vs_bank_s']:.1f} ms", jf["one_vs_bank_s"] / 0.01, f"{jf['threads']} threads")
    elif dm and dm.get("log_floor_s"):
        x = dm["best_loramix_s"] / dm["log_floor_s"]
        add(f"7. JS {dm['n']}x{dm['n']} vs the log floor", "<= 2x", f"{x:.2f}x "
            f"({dm['best_loramix_s']:.3f} s / {dm['log_floor_s']:.3f} s)", x / 2.0)
    if "distances" in stages:
        add(f"7. 1x{n} distances as generate calls them", "10 ms", f"{1e3 * stages['distances']:.1f} ms",
            stages["distances"] / 0.01)
    cb = doc["suites"].get("kernels", {}).get("combiner")
    if cb and cb.get("training"):
        r = cb["training"][0]
        t = r.get("process_first_s", r["seconds"])
        add(f"8. neural combiner training, {cb['members']} members", "5 s",
            f"{t:.2f} s (imports + first training in a fresh process)", t / 5.0,
            f"{r['epochs']} epochs, training CPU {r.get('cpu_s', float('nan')):.2f} s; Gram {cb['factor_gram_s']:.2f} s apart")
    if doc.get("wall_s"):
        t = doc["wall_s"] - doc.get("inputs_s", 0.0)
        suite = doc.get("args", {}).get("suite") or "all"
        add(f"9. `loramix bench --scale {doc['scale']}" + (f" --suite {suite}" if suite != "all" else "")
            + "` wall time", "600 s", f"{t:.0f} s", t / 600.0,
            "; ".join(x for x in ((f"inputs generated in {doc['inputs_s']:.0f} s apart"
                                   if doc.get("inputs_s", 0) > 0.5 else ""),
                                  "" if suite == "all" else "one suite only: the goal is about all of them") if x))
    ld = doc.get("load") or []
    load = ("; 1-min load average " + ", ".join(f"{x['where']} {x['loadavg_1_5_15'][0]:.1f}" for x in ld)) if ld else ""
    return ("### Goals of issue 11 (this run; ratio <= 1 is met)" + load + "\n\n"
            + _table(["goal", "bound", "measured", "ratio", "", "note"], rows) + "\n")
