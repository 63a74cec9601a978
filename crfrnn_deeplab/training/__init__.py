"""What ``train.py`` is built from: the typed config, the seeded data stream, the loss and schedule, metrics,
the post-processing CRF grid search, checkpoints of a run, stop signals and the metrics log. Nothing here is
imported by the library's other subsystems."""
