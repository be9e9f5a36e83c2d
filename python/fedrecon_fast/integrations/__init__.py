"""Other systems FedRecon runs on (optional extras; nothing here is imported with the package).

- :mod:`.ray` (``[ray]``): :class:`~fedrecon_fast.integrations.ray.RayExecutor` runs each
  round's clients on Ray actors that hold partitions of the users.
- :mod:`.flower_app` (``[flower]``): the Flower App, a ServerApp running
  :class:`fedrecon_fast.FedRecon` over SuperNodes that hold partitions of the users.
- :mod:`.flower` (``[flower]``): :class:`~fedrecon_fast.integrations.flower.FlowerFedRecon`
  (the App run through ``flwr run``), and the cross-device route, one SuperNode per user.
- :mod:`.partitions`: how users are split into partitions, cohorts routed to them, and their
  updates combined into exactly the local round.

Each executor has :func:`fedrecon_fast.kernels.train_round`'s signature and gives the local
trainer's results bit for bit; :class:`fedrecon_fast.FedRecon` takes any such object as its
``backend``, or a name from :data:`EXECUTORS`.
"""

from __future__ import annotations

import importlib

__all__ = ["EXECUTORS", "executor"]

#: Executors by the name ``FedRecon(backend=...)`` accepts: (module, class), made without arguments.
EXECUTORS = {"ray": ("fedrecon_fast.integrations.ray", "RayExecutor")}


def executor(name: str):
    """A new executor called ``name`` (:data:`EXECUTORS`), with its default settings."""
    if name not in EXECUTORS:
        raise ValueError(f"backend must be 'local', one of {sorted(EXECUTORS)} or an executor object; got {name!r}")
    module, cls = EXECUTORS[name]
    return getattr(importlib.import_module(module), cls)()
