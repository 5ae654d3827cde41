"""The bundled sentiment set (see README.md); `python -m tunesmith.recipes.classify.sentiment.build` regenerates it."""
