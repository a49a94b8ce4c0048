"""Neural combiner: training time on a paper-sized bank (502 members) from its Gram matrix,
ONNX Runtime inference time, and the cost of the Gram matrices themselves.

The bank is synthetic with planted structure (members = random mixtures of latent adapters,
distances = noisy distances of the mixture coefficients), so the validation loss can also be
compared with the normalized pipeline's.

    python benches/bench_combiner.py --threads 2 --out bench_out/combiner.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))


def planted_bank(N, K, P, seed, noise=0.3):
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((K, P)).astype(np.float32)
    c = rng.dirichlet(np.full(K, 0.3), size=N)
    X = (c @ latent + 0.05 * rng.standard_normal((N, P))).astype(np.float32)
    D = np.linalg.norm(c[:, None] - c[None], axis=-1)
    D = D + noise * D.std() * np.abs(rng.standard_normal((N, N)))
    return X, 0.5 * (D + D.T)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=502)
    ap.add_argument("--latents", type=int, default=30)
    ap.add_argument("--params", type=int, default=65536, help="flattened size of each synthetic member")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", default="16,32")
    ap.add_argument("--max-epochs", type=int, default=500, help="default: train_bank_combiner's")
    ap.add_argument("--patience", type=int, default=50, help="default: train_bank_combiner's")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--delta-module", default="1024,1024,16", help="out,in,r of one module for delta_gram timing ('' skips)")
    ap.add_argument("--out", default="bench_out/combiner.json")
    args = ap.parse_args()
    os.environ["LORAMIX_NUM_THREADS"] = str(args.threads)

    t_import = time.perf_counter()
    from loramix.weights import combiner as C
    from loramix.weights import gram as G_
    t_import = time.perf_counter() - t_import

    N = args.members
    res: dict = {"members": N, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                 "import_s": t_import, "max_epochs": args.max_epochs, "patience": args.patience,
                 "loadavg_start": os.getloadavg()[0]}
    X, D = planted_bank(N, args.latents, args.params, seed=0)

    # Gram via the core's streamed kernel, in 8 tensor groups (as a bank's tensors would come)
    groups = np.array_split(np.arange(args.params), 8)
    t = time.perf_counter()
    G = G_.factor_gram(([np.ascontiguousarray(X[i, g]) for i in range(N)] for g in groups), threads=args.threads)
    res["factor_gram_s"] = time.perf_counter() - t
    res["factor_gram_gflops"] = N * N * args.params / res["factor_gram_s"] / 1e9
    Gd = X.astype(np.float64) @ X.astype(np.float64).T
    res["factor_gram_max_rel_err"] = float(np.abs(G - Gd).max() / np.abs(Gd).max())

    ex = np.eye(N, dtype=bool)
    feats, names = C.pair_features({"js": D}, exclude=ex)
    res["training"] = []
    for H in (int(h) for h in args.hidden.split(",")):
        t, cpu = time.perf_counter(), time.process_time()
        comb, hist = C.train_combiner(feats, G, hidden=H, seed=0, max_epochs=args.max_epochs,
                                      patience=args.patience, lr=args.lr, feature_names=names, threads=args.threads)
        secs, cpu = time.perf_counter() - t, time.process_time() - cpu   # cpu: all threads of this process
        vr = np.array(hist.val_members)
        tuned = min(C.reconstruction_loss(C.normalized_weights(D, exclude=ex, temperature=T)[vr], G, vr).sum()
                    / G[vr, vr].sum() for T in (0.05, 0.1, 0.2, 0.3, 0.5, 1.0))
        first = {"process_first_s": t_import + secs} if not res["training"] else {}
        res["training"].append({"hidden": H, "seconds": secs, "cpu_s": cpu, "epochs": len(hist.epoch), **first,
                                "ms_per_epoch": 1e3 * secs / len(hist.epoch), "best_epoch": hist.best_epoch,
                                "val_loss": hist.best_val_loss, "normalized_T1_val_loss": hist.baseline_val_loss,
                                "normalized_best_T_val_loss": tuned})
        # inference in ONNX Runtime
        q1 = feats[:1]
        comb.weights(q1, ex[:1])
        t = time.perf_counter()
        for _ in range(20):
            comb.weights(q1, ex[:1])
        res["training"][-1]["onnx_weights_1_target_ms"] = (time.perf_counter() - t) / 20 * 1e3
        t = time.perf_counter()
        comb.weights(feats, ex)
        res["training"][-1][f"onnx_weights_{N}_targets_ms"] = (time.perf_counter() - t) * 1e3

    if args.delta_module:
        out_f, in_f, r = (int(x) for x in args.delta_module.split(","))
        rng = np.random.default_rng(1)
        As = [rng.standard_normal((r, in_f)).astype(np.float32) for _ in range(N)]
        Bs = [rng.standard_normal((out_f, r)).astype(np.float32) for _ in range(N)]
        for dt in (np.float64, np.float32):
            t = time.perf_counter()
            G_.delta_gram_module(As, Bs, np.full(N, 2.0), dtype=dt)
            res[f"delta_gram_module_{out_f}x{in_f}_r{r}_{np.dtype(dt).name}_s"] = time.perf_counter() - t

    res["loadavg_end"] = os.getloadavg()[0]
    print(f"bank: {N} members, synthetic, {args.params} params each; threads={args.threads}; "
          f"imports {t_import:.2f} s; load avg {res['loadavg_start']:.1f} -> {res['loadavg_end']:.1f}")
    print(f"factor_gram (core): {res['factor_gram_s']:.2f} s, {res['factor_gram_gflops']:.1f} GFLOP/s, "
          f"max rel err {res['factor_gram_max_rel_err']:.1e}")
    print(f"{'hidden':>6}{'train s':>9}{'cpu s':>7}{'epochs':>8}{'ms/epoch':>10}{'val loss':>10}{'norm T=1':>10}"
          f"{'norm best T':>12}{'ORT 1 tgt ms':>13}")
    for r in res["training"]:
        print(f"{r['hidden']:>6}{r['seconds']:>9.2f}{r['cpu_s']:>7.2f}{r['epochs']:>8}{r['ms_per_epoch']:>10.1f}{r['val_loss']:>10.4f}"
              f"{r['normalized_T1_val_loss']:>10.4f}{r['normalized_best_T_val_loss']:>12.4f}"
              f"{r['onnx_weights_1_target_ms']:>13.3f}")
    for k, v in res.items():
        if k.startswith("delta_gram"):
            print(f"{k}: {v:.2f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
