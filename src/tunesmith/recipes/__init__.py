"""The recipes: one package each, with one skeleton (``config.py`` the options, ``trainer.py`` the Trainer subclass,
``run.py`` ``train(config)`` and the command's ``cli(argv)``; a few more files where a recipe has more concerns)."""
