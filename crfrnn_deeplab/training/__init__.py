"""What ``train.py`` is built from, one concept a module: the typed config (:mod:`.config`), the seeded and
resumable data stream (:mod:`.data_stream`), the loss (:mod:`.loss`), the optimiser's parameter groups and
schedule (:mod:`.optim`), RNG state (:mod:`.reproducibility`), stop signals (:mod:`.signals`), several processes
(:mod:`.ddp`), the run's checkpoints (:mod:`.checkpoints`), the metrics log (:mod:`.metrics_log`), segmentation
metrics (:mod:`.metrics`), evaluation and the baselines (:mod:`.evaluation`), the post-processing CRF grid
search (:mod:`.grid_search`) and the final report (:mod:`.report`). The modules take plain arguments;
``train.py`` reads the config. Nothing here is imported by the library's other subsystems."""
