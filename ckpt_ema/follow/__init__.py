"""Following a run as it trains: what an average keeps beside its output to go on later (:mod:`.state`), and a
watcher that folds each checkpoint once the trainer has finished writing it (:mod:`.watch`). Each update runs
through :func:`ckpt_ema.pipeline.run`."""
