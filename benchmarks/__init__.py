"""bcopt's benchmarks, each run as ``python -m benchmarks.NAME`` from the
repository root (``--help`` for its options, ``--quick`` for a smoke run):

* ``update_cost``: cost of one optimizer update, Adam-BC, Sophia-BC and
  Shampoo-BC against optax (``--ref COMMIT``: against bcopt at COMMIT).
* ``step_time``: whole train steps of the LM example, per family, and
  Sophia's curvature estimators.
* ``lm_quality``: does bias correction pay? A tuned, seeded comparison.
* ``finetune_averaging``: fine-tuning with none / EMA / BEMA averaging.

``harness`` holds their shared plumbing and ``lm_runs`` the training runs
of the last two; results go to ``results/`` and the marked sections of
``RESULTS.md``.
"""
