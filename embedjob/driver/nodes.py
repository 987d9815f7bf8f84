"""The node watch: a run whose encode actors cannot be placed anywhere stops within a stated time.

When no live node of the cluster can hold even one encode actor (by the nodes' total
resources, not what is free: a busy node still counts) for ``--node-wait-s``, the driver stops
the run the way a graceful stop does (``driver/stop.py``): what the writers finished is
committed, the lease released, and the CLI exits ``NODE_WAIT_EXIT`` with one line naming the
missing resources, the wait and how to resume. The clock starts when the run starts, so a
cluster that never had such a node fails after the same wait. Without it a run whose node was
lost and never replaced (or a typo in ``--actor-resources``) would wait for ever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping

import ray

from embedjob.config import EmbedConfig
from embedjob.driver.stop import Stop

logger = logging.getLogger(__name__)

NODE_WAIT_EXIT = 75  # EX_TEMPFAIL: the run can be resumed once the cluster has the capacity
POLL_S = 2.0  # ray.nodes() is one GCS call: cheap at this rate


def actor_needs(config: EmbedConfig) -> dict[str, float]:
    """What one encode actor asks Ray for: CPUs, GPUs (if any) and the custom resources."""
    needs = {"CPU": config.cpus_per_actor}
    if config.gpus_per_actor > 0:
        needs["GPU"] = config.gpus_per_actor
    return needs | config.actor_resource_amounts


def missing(nodes: Iterable[Mapping], needs: Mapping[str, float]) -> dict[str, float]:
    """What no live node can give one encode actor; empty when one node can hold it.

    Args:
        nodes: ``ray.nodes()``: mappings with ``Alive`` and ``Resources`` (the node's totals).
        needs: ``actor_needs``.

    Returns:
        The resources no single live node has enough of (name -> amount one actor needs), or
        every need when each is somewhere but no node has them all together.
    """
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    if any(all(have.get(k, 0.0) >= v for k, v in needs.items()) for have in alive):
        return {}
    short = {k: v for k, v in needs.items() if not any(h.get(k, 0.0) >= v for h in alive)}
    return short or dict(needs)


def describe(short: Mapping[str, float]) -> str:
    """``encode_node=1, GPU=1``: the missing resources as the flags spell them."""
    return ", ".join(f"{k}={v:g}" for k, v in short.items())


class NodeWatch:
    """A driver thread asking the cluster every ``POLL_S`` whether an encode actor fits.

    Stands down when the stop's block unwinds (``stop.done``).
    """

    def __init__(self, needs: Mapping[str, float], wait_s: float, stop: Stop,
                 nodes: Callable[[], list[dict]] = ray.nodes) -> None:
        self.needs = dict(needs)
        self.wait_s = wait_s
        self.stop = stop
        self.nodes = nodes
        self.since: float | None = None  # when the capacity was last seen missing, first

    @classmethod
    def start(cls, config: EmbedConfig, stop: Stop) -> NodeWatch:
        """Watch the cluster for this run (a no-op outside the main thread: no stop comes)."""
        watch = cls(actor_needs(config), config.node_wait_s, stop)
        if stop.watched:
            threading.Thread(target=watch._loop, daemon=True, name="node-watch").start()
        return watch

    def poll(self, now: float) -> str | None:
        """One look at the cluster: the stop's reason once the wait is over, else None."""
        short = missing(self.nodes(), self.needs)
        if not short:
            if self.since is not None:
                logger.info("a node that can hold an encode actor is back")
            self.since = None
            return None
        if self.since is None:
            self.since = now
            logger.warning("no live node can hold an encode actor (missing %s): waiting up to "
                           "%.0f s (--node-wait-s) for one to join", describe(short), self.wait_s)
        if now - self.since < self.wait_s:
            return None
        return (f"the node watch: no live node had the resources for one encode actor (missing "
                f"{describe(short)}) for {self.wait_s:g} s (--node-wait-s)")

    def _loop(self) -> None:
        while not self.stop.done.wait(POLL_S):
            try:
                reason = self.poll(time.monotonic())
            except Exception:  # noqa: BLE001 - a GCS hiccup: look again at the next poll
                logger.debug("node watch: ray.nodes() failed", exc_info=True)
                continue
            if reason is not None:
                self.stop.request(reason, NODE_WAIT_EXIT)
                return
