"""tunesmith: fine-tune language models on the Hugging Face stack.

Python API (each takes a config object or a dict of the same keys as the YAML configs):

    from tunesmith.recipes import sft, spin, classify
    sft.train({"model_name_or_path": ..., "dataset": ..., "output_dir": ...})
    spin.train({...});  classify.train({...})
    from tunesmith.generate import generate          # batched generation with a model's saved template
"""

__version__ = "0.1.0"
