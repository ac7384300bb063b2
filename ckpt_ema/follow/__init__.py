"""Following a run as it trains: averages kept current from saved state (:mod:`.update`, :mod:`.state`), and a
watcher that folds each checkpoint once the trainer has finished writing it (:mod:`.watch`)."""
