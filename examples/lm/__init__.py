"""A Qwen2-style language model trained with bcopt optimizers.

Modules, one job each: ``model.py`` (the model, presets, pure logits and
loss), ``data.py`` (corpus, held-out plays, batches), ``config.py`` (the
settings dataclass that makes the flags), ``optimizer.py`` (the optimizer
table and chain), ``train.py`` (train step, eval step, loop; the command),
``checkpoint.py`` (orbax save, resume, ``--init-from``, read back) and
``plot.py`` (loss curves; also a command).

For benchmarks and notebooks::

    from examples.lm import checkpoint, config, model, optimizer, train

    summary = train.main(argv)                 # one run; None after --stop-at
    cfg = train.parse_args(argv)               # a config.Config
    model_cfg = config.model_config(cfg, vocab_size=256)
    prog = train.build(cfg, model_cfg)         # jitted steps, not run
    state = prog.init(jax.random.key(cfg.seed))
    state, loss = prog.train_steps[refresh](state, windows_MxBxT1, key)
    logits_fn, loss_fn = model.make_loss_fns(model_cfg)
    cfg, model_cfg, state = checkpoint.restore_run(run_dir)
    averages = optimizer.averaged_params(cfg, state["opt_state"])
"""
