"""The preference engine DPO and SPIN share: pairs on disk, reference log-probs scored once, the pairwise losses and
the trainer. SPIN is "generate the pairs, then preference-train"; DPO is "read the pairs, then preference-train".

* :mod:`.loss` — sigmoid (DPO), hinge, ipo, dpop (DPO-Positive), simpo and orpo on summed answer log-probs.
* :mod:`.pairs` — the pair collator (padded or padding-free), both answers' log-probs in one forward with lean
  logits, and the reference's log-probs scored once, noise-free, into Arrow shards stored beside the pairs.
* :mod:`.trainer` — :class:`~.trainer.PreferenceTrainer`, a ``transformers.Trainer`` with NEFTune on the policy pass
  only, per-step reward metrics and noise-free evaluation of reward accuracy and margins.
"""
