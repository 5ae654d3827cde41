"""The bundled sentiment set (see README.md); `python -m tunesmith.data.sentiment.build` regenerates it."""
