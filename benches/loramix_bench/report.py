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
                rows.append([c["label"], "-", "-", "-", "-", "-", "-", "-", c["error"][:80]])
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
            frac = f"{100 * gbs / bw:.0f}%" if gbs and bw == bw else "-"
            note = []
            if c.get("load_s") is not None:
                note.append(f"load {c['load_s']:.1f} s")
            if c.get("layers") and c["layers"] < 32:
                note.append(f"{c['layers']} of 32 layers")
            if c.get("first_s") is not None:
                note.append(f"first run in process {c['first_s']:.2f} s")
            if c.get("mix_into_s") is not None:
                note.append(f"in mix_into {c['mix_into_s']:.2f} s")
            if c.get("minor_faults_per_run") is not None:
                note.append(f"{c['minor_faults_per_run']:,.0f} minor faults/run, sys {c['sys_s_per_run']:.2f} s")
            rows.append([c["label"], n_used, _f(c["median_s"]), _f(gbs), frac, _mb(c.get("peak_rss")),
                         _mb(c.get("peak_anon")), vs, ", ".join(note)])
        for k, v in mx.items():
            if isinstance(v, dict) and "skipped" in v:
                rows.append([k, "-", "-", "-", "-", "-", "-", "", f"skipped: {v['skipped']}; {v['predicted']}"])
        parts.append("### One adapter from the bank (median seconds; GB/s of bank tensors read; "
                     f"% of the measured read bandwidth {_f(bw)} GB/s; peak RSS = VmHWM of a fresh process, "
                     "anon = sampled peak RssAnon, MB)\n\n"
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
            rows.append([c["label"], f"{c['Q']}x{c['K']}x{c['P']:,}", _f(c["median_s"]), _f(g),
                         f"{100 * g / gemm:.0f}%" if gemm == gemm else "-",
                         f"{g / tl:.2f}x" if tl else "-", _mb(c.get("peak_rss")),
                         f"load {c['load_s']:.1f} s" if c.get("load_s") else ""])
        if rows:
            parts.append(f"### Leave-one-out: Q adapters in one pass (GFLOP/s; % of the best fp32 GEMM "
                         f"measured in this run, {_f(gemm)} GFLOP/s)\n\n"
                         + _table(["case", "Q x K x P", "median s", "GFLOP/s", "% best GEMM", "x torch.matmul",
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
        for k in ("warm", "cold"):
            v = e2e.get(k)
            if v:
                extra = f"cpu {v['cpu_s']:.2f} s" + (f", sys {v['sys_s']:.2f} s, {v['minor_faults']:,} minor faults"
                                                      if "sys_s" in v else f", {v['major_faults']:,} major faults")
                rows.append([k, _f(v["median_s"]), _f(v["min_s"]), v["runs"], _mb(v["peak_rss"]),
                             extra + "; " + (v.get("how", "") or (v.get("error") or ""))])
        st = _cases(doc, "e2e")
        stages = ""
        if st and "stages_median_s" in st[0]:
            s = st[0]["stages_median_s"]
            stages = ("\n\nStages in-process (warm, median): " + ", ".join(f"{k} {v:.3f} s" for k, v in s.items())
                      + f"; total {st[0]['total_median_s']:.3f} s; peak RSS {_mb(st[0]['peak_rss'])} MB "
                        f"(anon {_mb(st[0]['peak_anon'])} MB). Python start + imports: "
                        f"{e2e.get('python_import_s', float('nan')):.2f} s.")
        parts.append(f"### End to end: `{e2e.get('command')}`\n\n"
                     + _table(["page cache", "median s", "min s", "runs", "peak RSS MB", "how"], rows) + stages)
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
    mx = [c for c in doc["suites"].get("mix", {}).get("cases", []) if "error" not in c and "median_s" in c]
    if mx:
        fig, axs = plt.subplots(1, 2, figsize=(13, 0.35 * len(mx) + 1.5))
        names = [c["label"] for c in mx]
        cols = ["C0" if n.startswith("loramix") else "C1" for n in names]
        axs[0].barh(names, [c["median_s"] for c in mx], color=cols)
        axs[0].set_xscale("log")
        axs[0].set_xlabel("median seconds (log)")
        axs[1].barh(names, [c.get("peak_rss", 0) / MB for c in mx], color=cols)
        axs[1].axvline(512, color="k", ls="--", lw=1)
        axs[1].set_xscale("log")
        axs[1].set_xlabel("peak RSS MB (log), 512 MB goal dashed")
        axs[1].set_yticks([])
        for a in axs:
            a.invert_yaxis()
        fig.suptitle(f"mix suite, N={doc['n']} (loramix blue, peers orange)")
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
    """The issue's goals against this run's numbers (met / missed, by how much)."""
    ce = _cases(doc, "ceilings")
    bw = max((c.get("gb_per_s", 0) for c in ce if c["spec"]["case"] == "ceiling_read"), default=float("nan"))
    gemm = max((c.get("gflop_per_s", 0) for c in ce if c["spec"]["case"] == "ceiling_gemm"), default=float("nan"))
    mix = [c for c in _cases(doc, "mix") + _cases(doc, "fp32") + _cases(doc, "e2e") if "error" not in c]
    allm = {c["label"]: c for c in mix if c["spec"]["case"].startswith("loramix") or c["spec"]["case"] == "e2e_breakdown"}
    lm = {k: c for k, c in allm.items() if "prototype" not in k}
    proto = {k: c for k, c in allm.items() if "prototype" in k}
    rows = []

    def add(goal, value, ok, is_proto=False):
        rows.append([goal, value, ("would be met" if ok else "still missed") if is_proto else ("met" if ok else "MISSED")])

    rr = " (re-run, quiet machine)"   # a re-run of a headline case, when made, is the one judged
    fa = lm.get("loramix factors, top-k all" + rr) or lm.get("loramix factors, top-k all")
    f16 = lm.get("loramix factors, top-k 16" + rr) or lm.get("loramix factors, top-k 16")
    if fa:
        frac = fa["gb_per_s"] / bw
        add("factors, all N, >= 60% of read bandwidth", f"{fa['gb_per_s']:.2f} GB/s = {100 * frac:.0f}% of {bw:.2f}",
            frac >= 0.6)
        add("factors, all N, peak RSS <= 512 MB", f"VmHWM {_mb(fa['peak_rss'])} MB (anon {_mb(fa['peak_anon'])} MB)",
            fa["peak_rss"] <= 512 * MB)
    if lm:
        worst = max(lm.values(), key=lambda c: c.get("peak_rss", 0))
        add("every loramix case peak RSS <= 512 MB", f"max VmHWM {_mb(worst['peak_rss'])} MB ({worst['label']}); "
            f"max anon {_mb(max(c.get('peak_anon', 0) for c in lm.values()))} MB",
            worst["peak_rss"] <= 512 * MB)
    if fa and f16:
        x = fa["median_s"] / f16["median_s"]
        add("top-k 16 >= 20x faster than all", f"{x:.1f}x ({fa['median_s']:.3f} s / {f16['median_s']:.3f} s)", x >= 20)
    for c in allm.values():
        if c["spec"]["case"] in ("loramix_loo", "loramix_loo_kernel"):
            g = c["gflop_per_s"]
            add(f"LOO >= 70% of best fp32 GEMM ({c['label']})", f"{g:.1f} GFLOP/s = {100 * g / gemm:.0f}% of {gemm:.1f}",
                g >= 0.7 * gemm, "prototype" in c["label"])
    pa = proto.get("loramix factors, top-k all, + vectorized mix.py (fix prototype)")
    p16 = next((c for k, c in proto.items() if "vectorized" in k and "top-k all" not in k), None)
    if pa and p16:
        x = pa["median_s"] / p16["median_s"]
        add("top-k 16 >= 20x faster than all (vectorized mix.py prototype)",
            f"{x:.1f}x ({pa['median_s']:.3f} s / {p16['median_s']:.3f} s)", x >= 20, True)
    for c in proto.values():
        if c["spec"]["case"] == "loramix_mix" and c["spec"].get("release"):
            add(f"peak RSS <= 512 MB ({c['label']})", f"VmHWM {_mb(c['peak_rss'])} MB, "
                f"{c['gb_per_s']:.2f} GB/s", c["peak_rss"] <= 512 * MB, True)
    w = doc["suites"].get("e2e", {}).get("warm")
    if w:
        add("end to end, 1,000 examples vs the bank, warm <= 1.5 s", f"{w['median_s']:.2f} s (CLI, fresh process)",
            w["median_s"] <= 1.5)
    return "### Goals (this run)\n\n" + _table(["goal", "measured", ""], rows) + "\n"
