"""The ``beyondgrad`` console app: ``pip install "beyondgrad[app]"`` (matplotlib, scikit-learn,
tqdm).

* :mod:`~beyondgrad.app.cli`: the ``beyondgrad`` command (demo, coverage, train, plot, bench).
* :mod:`~beyondgrad.app.train`: ``beyondgrad train`` (run directories, checkpoints, resume).
* :mod:`~beyondgrad.app.rundir`: atomic writes, the tolerant log reader, checkpoint files.
* :mod:`~beyondgrad.app.tasks`: the built-in model zoo (trainable tasks, benchmark problems).
* :mod:`~beyondgrad.app.optimizers`: the one optimizer factory.
* :mod:`~beyondgrad.app.bench`: ``beyondgrad bench optim`` (time to target, AlgoPerf-style).

``import beyondgrad`` never imports this package; the app's own dependencies are imported only
where they are used.
"""
