"""Human-readable reports and plots written next to each run's JSON: :mod:`~slugkit.report.unlearn` (``report.md``,
``pareto.png``), :mod:`~slugkit.report.compare` (``compare.md``, ``tradeoff.png``), :mod:`~slugkit.report.sd`
(the generated-image section of ``slug demo --target sd``). Writers take result dicts; they run nothing."""
