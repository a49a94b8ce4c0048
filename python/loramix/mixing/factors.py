"""The ``factors`` mix (the paper's): ``A = Σ w_i A_i`` and ``B = Σ w_i s_i B_i`` for every
module and target, run as one pass of the compiled core over the bank (see
:mod:`loramix.mixing.modes` for the modes and their formulas).
"""
from __future__ import annotations

import numpy as np

from loramix.bank import peft_io

# Calls the input gatherer may add ahead of the pass (bounds the TensorRefs held at once: one
# per member and factor per call; a module is two calls).
PASS_AHEAD = 16


def mix_factors(bank, W, modules: list, infos, route, threads, written=None, bar=None) -> None:
    """``factors`` over every module of ``modules`` as one pass of the core
    (:class:`loramix.core.tensors.MixPass`): its threads go from one tensor to the next without
    waiting for each other at the end of each tensor (192 such waits were half of the mix
    threads' sleeps at N = 502). A helper thread gathers the modules' core inputs (a TensorRef
    per member and factor: ~0.25 s at N = 502 in all) and adds them while the pass runs, at most
    ``PASS_AHEAD`` calls ahead of it. ``written(name)`` and the progress bar follow the pass in
    module order. An error while gathering a module's inputs is raised once the modules before
    it are mixed; nothing after it is mixed. ``route``: where each row goes, see
    :func:`add_factors_jobs`."""
    import threading

    from loramix.core import tensors

    mp = tensors.MixPass(threads)
    cond = threading.Condition()
    ends: list = []   # per module added: (calls in the pass once it is in, name, refs read through the mapping)
    state = {"done": 0, "stop": False, "error": None}

    def feed():
        try:
            for name, holders in modules:
                jobs = factors_jobs(bank, W, name, holders, infos)
                with cond:
                    cond.wait_for(lambda: state["stop"] or len(mp) - state["done"] <= PASS_AHEAD)
                    if state["stop"]:
                        return
                add_factors_jobs(mp, name, jobs, route)
                mapped = [r for job in jobs for r in job[1] + job[2] if not getattr(r, "pread", False)]
                with cond:
                    ends.append((len(mp), name, mapped))
        except BaseException as e:  # noqa: BLE001 - raised on the caller's thread below
            state["error"] = e
        finally:
            mp.close()

    reported = 0

    def progress(done: int) -> None:
        nonlocal reported
        with cond:
            state["done"] = done
            cond.notify_all()
            finished = []
            while reported < len(ends) and ends[reported][0] <= done:
                finished.append(ends[reported])
                reported += 1
        for _, name, mapped in finished:
            if mapped:   # sources read through the mapping (beyond the descriptor budget) leave once read
                tensors.release_pages(mapped)
            if written is not None:
                written(name)
            if bar is not None:
                bar.update(1)

    feeder = threading.Thread(target=feed, name="loramix-mix-inputs", daemon=True)
    feeder.start()
    try:
        mp.run(progress)
    finally:
        with cond:
            state["stop"] = True
            cond.notify_all()
        feeder.join()
    if state["error"] is not None:
        raise state["error"]


def factors_jobs(bank, W, name, holders, infos) -> list:
    """Module ``name``'s ``factors`` core calls: ``[(targets, a_src, b_src, wa, wb)]``, the targets
    grouped by their output rank (usually one group)."""
    groups: dict[int, list[int]] = {}
    for q in range(W.shape[0]):
        if name in infos[q].ranks:
            groups.setdefault(infos[q].ranks[name], []).append(q)
    return [(targets, *factors_inputs(bank, W, name, holders, targets, r_out)) for r_out, targets in groups.items()]


def add_factors_jobs(mp, name, jobs, route) -> None:
    """Add module ``name``'s jobs (:func:`factors_jobs`) to the pass ``mp``: its A, then its B.
    Row q goes to ``route(q, key)`` = ``(writer or None, entry name)`` for the PEFT key ``key``
    (None: not written here, e.g. a distributed worker's rows of other targets; a call with no
    row written is skipped). Every target of a job enters its call either way, so the rows
    written are the bytes of the local run."""
    for targets, a_src, b_src, wa, wb in jobs:
        for ab, src, w in (("A", a_src, wa), ("B", b_src, wb)):
            outs = [route(q, peft_io.tensor_key(name, ab)) for q in targets]
            if any(o[0] is not None for o in outs):
                mp.add([o[0] for o in outs], [o[1] for o in outs], src, w)


def factors_inputs(bank, W, name, holders, targets, r_out):
    """The sources and weights of one ``factors`` core call: ``(a_src, b_src, wa, wb)``."""
    from loramix.core import tensors

    h = np.asarray(holders)
    used = h[(W[np.ix_(targets, h)] != 0).any(axis=0)].tolist()   # one numpy call, not one per member
    mem = [bank.members[i] for i in used]
    specs = [m.modules[name] for m in mem]
    scale = [ms.scaling for ms in specs]
    if all(ms.rank == r_out for ms in specs):   # the usual case: one core call per factor
        files = [m.file for m in mem]
        a_src = tensors.tensor_refs(files, [ms.a_key for ms in specs])
        b_src = tensors.tensor_refs(files, [ms.b_key for ms in specs])
    else:
        a_src, b_src = [], []
        for m, ms in zip(mem, specs):
            if ms.rank == r_out:
                a_src.append(m.file.tensor(ms.a_key))
                b_src.append(m.file.tensor(ms.b_key))
            else:   # zero-pad a lower-rank member: extra rows of A / columns of B are zero
                a_src.append(m.padded(ms.a_key, r_out, 0))
                b_src.append(m.padded(ms.b_key, r_out, 1))
    wa = W[np.ix_(targets, used)]
    wb = wa * np.asarray(scale)[None, :]
    return a_src, b_src, wa, wb
