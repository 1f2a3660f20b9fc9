"""The embedded world: everything slugkit ships so that unlearning is real offline.

* :mod:`~slugkit.world.render` — the procedurally drawn world: 60 invented identities, 30 object classes, captions,
  the image renderer and shard writers;
* :mod:`~slugkit.world.train` — the tiny open_clip CLIP's trainer (the model in ``assets/embedded``);
* :mod:`~slugkit.world.t2i` / :mod:`~slugkit.world.t2i_train` — the tiny text-to-image model (``assets/embedded_t2i``),
  its pipeline and judge, and its trainer;
* :mod:`~slugkit.world.demo_data` — the world written to disk in the layouts a real run reads (pool shards,
  validation and test class folders).

Nothing below the workflows (:mod:`slugkit.workflows`) imports this package; it imports data, models, eval and the
integrations, never a workflow.
"""
