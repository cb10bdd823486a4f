"""A sequential round (cyclic weight transfer): the model visits the sites one after another.

The strategy (:class:`voxgrid.strategies.Cyclic`) says the visiting order; this module runs it. Each
hop is an ordinary train job at that node, started from the weights the previous hop produced: the
node validates the plan, checks its policy and budget, applies its privacy filters and writes its
ledger entry before the update leaves, exactly as for an aggregated round. A site whose hop fails
is dropped for the rest of the round and the next site starts from the last good weights; the
round fails (the global model unchanged) when fewer than ``min_nodes`` sites answered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from voxgrid import tensors
from voxgrid.jobs import JOB_ERRORS, describe
from voxgrid.selection import client_update
from voxgrid.wire import JobStatus

if TYPE_CHECKING:
    from voxgrid.experiment import Experiment

Outcome = tuple[JobStatus | None, str | None]


def sequential_round(exp: Experiment, rnd: int) -> list[Outcome]:
    """Run round ``rnd`` of ``exp`` hop by hop; set ``exp.global_weights`` to the last hop's weights.

    Returns per pointer (its last hop's status, its ``compute_s`` summed over the site's hops, and None)
    or (None, why it was dropped), as
    :meth:`Experiment._plain_round` does. With ``exp.selection``, each hop's local model is observed
    against the weights that hop started from.
    """
    strategy, pointers = exp.strategy, exp.pointers
    hops = strategy.visits(rnd, len(pointers))
    outcomes: list[Outcome] = [(None, "not visited this round")] * len(pointers)
    dropped: set[int] = set()
    weights = exp.global_weights
    for hop, i in enumerate(hops):
        if i in dropped:
            continue
        p = pointers[i]
        blob = tensors.dumps(weights)
        wid = tensors.digest(blob)
        req = exp._job(p, rnd, wid, "train")
        req = req.model_copy(update={"seed": strategy.hop_seed(req.seed, hop // len(pointers))})
        try:
            st = exp._await(p, req, blob)
            delta = exp.jobs.update(p, st, like=weights)
        except JOB_ERRORS as exc:
            outcomes[i] = (None, describe(exc))
            dropped.add(i)
            continue
        if outcomes[i][0] is not None:  # a later pass: the site's compute is every hop's it ran
            spent = outcomes[i][0].metrics.compute_s + st.metrics.compute_s
            st = st.model_copy(update={"metrics": st.metrics.model_copy(update={"compute_s": spent})})
        update = client_update(p, st, delta)
        if exp.selection:
            exp.selection.observe_local(rnd, weights, [update])
        weights = strategy.aggregate(weights, [update])
        outcomes[i] = (st, None)
    exp._check_answered(rnd, outcomes)
    exp.global_weights = weights
    return outcomes
