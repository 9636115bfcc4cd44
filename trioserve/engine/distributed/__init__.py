"""One model across several processes (ranks) with ``mlx.distributed``, started by ``mlx.launch``.

Theory of operation
-------------------
Every rank loads its tensor-parallel shard of the model (mlx-lm's ``model.shard(group)``) and
runs the same MLX worker loop (engine/worker.py) in lock step: each forward pass all-sums
partial results across ranks, so every rank's batch must hold the same sequences, in the same
order, with the same shapes, at every step. Rank 0 alone runs Hypercorn and the API.

Rank 0's worker (``LeaderWorker``) decides everything: which requests enter the batch, which
leave (cancel, stop string, fault), whether a prefill chunk is cut between layers, when a step
runs. Before each step it broadcasts one *round* (rounds.py): the operations it applied since
the last round, whether it steps now, and a digest of the previous step's tokens. The other
ranks (``FollowerWorker``) apply the same operations to their own batch and step with it; a
digest that differs from their own means the ranks diverged, and they stop. While rank 0 has
nothing to do it sends an empty round every second, so a rank that died is noticed even when
idle.

Failure is bounded: a lost peer makes a collective raise within about a second (the ring
backend's socket errors), which ends the leader's worker, fails its requests and makes
``trioserve serve`` exit non-zero. A peer that stops answering blocks a collective forever:
rank 0's watchdog (a Trio task beside the worker thread) gives up after ``--rank-timeout``
seconds without progress, fails every request and leaves the stuck thread behind.
"""
