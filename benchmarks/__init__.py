"""bcopt's benchmarks: ``python -m benchmarks.NAME`` from the repository root
(``--help``, ``--quick``); each module's docstring says what it measures.
``harness`` and ``lm_runs`` hold their shared code; results go to
``results/`` and the marked sections of ``RESULTS.md``.
"""
