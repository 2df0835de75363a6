"""Flower's SecAgg+ server workflow, made to survive a node that drops before it has shared its keys.

Flower 1.42's ``SecAggPlusWorkflow`` keeps every node sampled at ``setup`` in ``sampled_node_ids``
and in the neighbour sets. A node that fails in ``setup`` or ``share_keys`` never sent its key
shares and no client masked with it (clients mask only with the nodes whose shares reached them);
yet in ``unmask`` the server lists it as *dead* to its neighbours, each of whom fails looking up a
share it never received (``KeyError`` in ``secaggplus_mod._unmask``), and the server then finds
fewer than ``threshold`` shares for it: the whole sum halts. Measured in this repository with one
of 5 nodes failing in ``setup`` (tests/test_flower_faults.py).

:class:`DropTolerantSecAggPlus` fixes this on the server side only, exactly as the SecAgg+ paper
treats such a node (Bell et al., CCS'20: a client outside ``U_2`` is out of the round): right after
``share_keys`` the cohort becomes the nodes that completed it, and every neighbour set is cut to that
cohort. Nothing a client sends or checks changes, no mask is left in the sum (no surviving node
ever masked with a removed one), and every existing threshold check still runs on the smaller
cohort. Nodes failing in ``collect_masked_vectors`` (their masks recovered from shares) or
``unmask`` (their input stays in the sum) were already handled by Flower.
"""

from __future__ import annotations

from flwr.server.workflow import SecAggPlusWorkflow


class DropTolerantSecAggPlus(SecAggPlusWorkflow):
    """``SecAggPlusWorkflow`` whose cohort after ``share_keys`` is the nodes that completed it."""

    def share_keys_stage(self, grid, context, state) -> bool:  # noqa: D102 - see the module docstring
        ok = super().share_keys_stage(grid, context, state)
        shared = set(state.active_node_ids)
        removed = set(state.sampled_node_ids) - shared
        if removed:
            state.sampled_node_ids = shared
            for nid in list(state.nid_to_neighbours):
                if nid in removed:
                    del state.nid_to_neighbours[nid]
                else:
                    state.nid_to_neighbours[nid] &= shared
            ok = ok and self._check_threshold(state)
        return ok
