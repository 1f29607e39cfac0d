"""bcopt's benchmarks, each run as ``python -m benchmarks.NAME`` from the
repository root (``--help``; ``--quick`` for a smoke run): ``update_cost``
(one optimizer update against optax), ``step_time`` (the LM example's train
steps), ``lm_quality`` (does bias correction pay?) and
``finetune_averaging`` (none / EMA / BEMA). ``harness`` holds their
plumbing, ``lm_runs`` the training runs of the last two; results go to
``results/`` and the marked sections of ``RESULTS.md``.
"""
