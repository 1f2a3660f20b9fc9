"""The workflows: each a readable sequence of named steps (load → data → gradients → layers → search → patch →
report) over the layers below.

* :mod:`~slugkit.workflows.unlearn` — one SLUG run (``slug unlearn``, ``slug demo``); its inputs in
  :mod:`~slugkit.workflows.inputs`, what it writes in :mod:`~slugkit.workflows.records`, several concepts one after
  another in :mod:`~slugkit.workflows.sequential`;
* :mod:`~slugkit.workflows.world_runs` — the configuration of a run on the embedded world;
* :mod:`~slugkit.workflows.compare` — SLUG beside the baselines (``slug compare``): one concept or several jointly
  (:mod:`~slugkit.workflows.compare_joint`) and one after another (:mod:`~slugkit.workflows.compare_sequential`), with
  the measuring helpers in :mod:`~slugkit.workflows.compare_support`;
* :mod:`~slugkit.workflows.sd_demo` — SLUG for the embedded text-to-image pipeline (``slug demo --target sd``), its
  generator-aware layer choice and step search in :mod:`~slugkit.workflows.sd_generator`.

Report writers live in :mod:`slugkit.report`; the command line in :mod:`slugkit.cli`.
"""
