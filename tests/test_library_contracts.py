"""The library internals tunesmith relies on, pinned in one place: an upgrade of transformers, peft, trl, accelerate,
datasets, lm-eval (or torch) that changes one of them fails HERE, by name, with the tunesmith code that depends on it.

Each test checks that the thing exists with the signature tunesmith calls or overrides, and where it is cheap, the
behaviour tunesmith assumes (tiny models built from configs; no training). Where the behaviour lives in a long
library method that cannot be run alone, the test reads its source for the calls tunesmith's code mirrors or depends
on, in order. When a test here fails: read the library's change, fix the tunesmith module named in the message, then
update the pin.

Pinned (library thing -> where tunesmith uses it):

transformers.Trainer
- ``compute_loss(model, inputs, return_outputs, num_items_in_batch)`` -> overridden by recipes/sft/trainer.py
  (TunesmithTrainer), preference/trainer.py (PreferenceTrainer: SPIN and DPO), recipes/classify/trainer.py
  (ClassifierTrainer, calls super with num_items_in_batch=).
- ``model_accepts_loss_kwargs``: decides whether ``training_step`` divides the loss by the accumulation steps ->
  TunesmithTrainer sets True (its loss is already divided by num_items_in_batch), PreferenceTrainer False (a per-pair
  mean).
- the ``average_tokens_across_devices`` scaling in ``compute_loss`` (``num_processes // get_tp_size()``, ``n_gpu``)
  -> mirrored in TunesmithTrainer.compute_loss.
- ``evaluate(eval_dataset, ignore_keys, metric_key_prefix)``, ``callback_handler.on_evaluate(..., metrics=)`` ->
  TunesmithTrainer.evaluate, PreferenceTrainer.evaluate; ``log(logs, start_time)`` -> PreferenceTrainer.log.
- ``_set_signature_columns_if_needed`` / ``_signature_columns`` read by ``_remove_unused_columns`` -> PreferenceTrainer.
- ``neftune_noise_alpha`` attribute (set from the args in ``__init__``, read by ``train``) -> neftune.py
  NEFTuneTrainerMixin resets it to keep transformers' padded-length hook off.
- ``training_step(model, inputs, num_items_in_batch)``, ``current_gradient_accumulation_steps`` ->
  selftest/checks.py (_trl_step_memory).
- ``accelerator.num_processes``, ``get_tp_size()``, ``is_fsdp_enabled``, ``is_deepspeed_enabled``, ``pop_callback``,
  ``add_callback``, ``state.log_history / best_model_checkpoint / best_metric`` -> sft/spin/classify run.py,
  callbacks.readable_logs.
- ``_save_checkpoint`` writes trainer_state.json after the weights, optimizer, scheduler and RNG states, and refreshes
  ``ExportableState`` callbacks into ``stateful_callbacks`` first -> rundir.checkpoint_problem (a checkpoint without a
  readable trainer_state.json is torn), rundir.checkpoint_callback / checkpoint_fingerprint.
- ``TrainerState(stateful_callbacks=[...]).save_to_json``: ``{"ClassName": callback.state()}``, a list when a class is
  registered twice -> rundir.checkpoint_fingerprint.
- RNG states restored (``_load_rng_state``) only after ``on_train_begin`` -> neftune.seed_rank_stream (a resumed rank
  continues its own noise stream).
- callback events ``on_train_begin/on_train_end/on_step_end/on_pre_optimizer_step/on_log/on_save/on_evaluate`` with
  ``model=`` / ``logs=`` / ``metrics=`` keywords -> callbacks.py (DivergenceStop, PoliteStop, JsonlMetrics),
  neftune.py (NEFTuneCallback, rank_seed_callback), rundir.py (TunesmithRun), selftest/measure.py.
- ``ProgressCallback.training_bar`` (a tqdm made in on_train_begin), ``PrinterCallback`` -> callbacks.py readable logs.
- TrainingArguments fields read by recipes/training.py (check_training_values, TRAJECTORY_KEYS), sft/spin/classify.
- ``integration_utils.INTEGRATION_TO_CALLBACK`` keys == recipes/training.py REPORTERS (copied to keep imports light).
- ``get_scheduler(..., scheduler_specific_kwargs=)`` raising TypeError on an unknown key -> training.check_scheduler.

transformers models
- ``from_pretrained(output_loading_info=True, ignore_mismatched_sizes=True, dtype=)``: ``missing_keys``,
  ``unexpected_keys``, ``mismatched_keys`` as (name, checkpoint shape, model shape) -> models.check_loading_info,
  classify trainer.load_classifier.
- forward ``logits_to_keep=1``, ``get_decoder()`` output ``last_hidden_state``, ``get_output_embeddings()``, the
  causal-LM loss ``sum / num_items_in_batch`` -> scoring.py (lean logits; the full-logits fallback).
- ``resize_token_embeddings(n, mean_resizing=True)`` -> models.resize_embeddings.
- ``utils.generic.is_flash_attention_requested(config)``; ``modeling_flash_attention_utils._is_packed_sequence``
  (packed rows only for a batch of ONE row) -> scoring.needs_one_row / one_row; ``AttentionInterface``,
  ``AttentionMaskInterface``, ``flash_attention_mask``, ``prepare_fa_kwargs_from_position_ids`` ->
  tests/test_packed_flash.py (its FlashAttention emulation).
- ``utils.import_utils.is_flash_attn_2_available / is_flash_attn_3_available / is_torch_flex_attn_available`` ->
  config.check_attn_implementation, selftest/checks.py.
- ``models.auto.modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING`` -> classify trainer.load_classifier.
- a ``StoppingCriteria`` returning one bool per row stops rows one by one -> generate.py (_TokenHook, on_token).

peft
- a PeftModel forwards ``get_input_embeddings / get_output_embeddings / get_decoder / merge_and_unload /
  get_base_model`` to its base and has no ``.module`` -> neftune.input_embedding_module, scoring,
  models.unwrap_distributed, models.merge_adapter, spin and classify saves, plan.py.
- ``target_modules`` matching (a module's name or its last dotted parts) -> models.check_module_names;
  ``"all-linear"`` leaves the output head out -> classify trainer._lora_targets.
- ``PeftModel.from_pretrained(model, path)``, ``prepare_model_for_kbit_training(use_gradient_checkpointing=)`` ->
  models.load_model_and_tokenizer, models.wrap_lora.

accelerate / torch / datasets
- ``DistributedType.DEEPSPEED.value == "DEEPSPEED"``, ``Accelerator.get_state_dict`` -> models.gathered_state_dict.
- torch ``nn.utils.get_total_norm(error_if_nonfinite=)`` -> callbacks._finite_grad_norm; ``fsdp.FSDPModule`` ->
  scoring._sharded; ``checkpoint.state_dict.get_model_state_dict / StateDictOptions(full_state_dict, cpu_offload)``
  -> models.gathered_state_dict.
- ``datasets.fingerprint.Hasher.hash``, ``datasets.config.HF_DATASETS_CACHE``, ``Features / List / Value``,
  ``Dataset.from_file``, ``concatenate_datasets`` -> data/prepare.py, data/source.py.

lm-eval
- ``HFLM._loglikelihood_tokens(requests, disable_tqdm, override_bs)``, reached from ``TemplateLM.loglikelihood`` with
  requests ``((context, continuation), context_ids, continuation_ids)``; ``HFLM(pretrained=<model>, tokenizer=,
  batch_size=, device=)`` and its ``backend / max_length / batch_size / tokenizer / device / cache_hook`` ->
  evaluation/lm_eval_bridge.py (LeanHFLM); ``TaskManager(include_path=, include_defaults=).all_tasks``,
  ``simple_evaluate``'s keywords -> lm_eval_bridge.run_tasks.

trl (optional) / vllm (optional, GPU)
- ``SFTTrainer(model, args, processing_class, train_dataset, callbacks)``, ``SFTConfig.max_length``,
  ``DPOTrainer(callbacks=)`` -> neftune.NEFTuneCallback's documented use, selftest/checks.py.
- ``LLM(model, tokenizer, seed, dtype, load_format, trust_remote_code)``, ``SamplingParams(max_tokens, min_tokens,
  repetition_penalty, stop_token_ids, temperature, top_p, top_k, seed)`` -> generate.generate_vllm.
"""
import dataclasses
import inspect
import json
import re

import pytest
import torch


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def takes(fn, names, users: str) -> None:
    """``fn`` accepts every keyword in ``names`` (or **kwargs)."""
    sig = inspect.signature(fn)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    missing = [n for n in names if n not in sig.parameters]
    assert not missing, f"{fn.__qualname__} no longer takes {missing} (signature {sig}): {users} pass them"


def in_order(source: str, needles, what: str, users: str) -> None:
    """Every needle appears in ``source``, in this order."""
    at = -1
    for n in needles:
        found = source.find(n, at + 1)
        assert found >= 0, f"{what}: no longer contains {n!r} after {needles[:needles.index(n)]}; {users} rely on it"
        at = found


@pytest.fixture(scope="module")
def tiny():
    """A tiny Llama (vocabulary 48, width 16, one layer), in memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("contracts-tiny")
    tiny.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path_factory.mktemp("contracts-trainer")), use_cpu=True,
                             report_to="none", disable_tqdm=True)


# ------------------------------------------------------------------------------------------------ transformers.Trainer


def test_trainer_methods_tunesmith_overrides_keep_their_signatures():
    from transformers import Trainer

    expected = {
        "compute_loss": (["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
                         "sft/classify trainer.py, preference/trainer.py compute_loss"),
        "evaluate": (["self", "eval_dataset", "ignore_keys", "metric_key_prefix"],
                     "TunesmithTrainer.evaluate, PreferenceTrainer.evaluate"),
        "log": (["self", "logs", "start_time"], "PreferenceTrainer.log"),
        "training_step": (["self", "model", "inputs", "num_items_in_batch"], "selftest/checks.py _trl_step_memory"),
        "get_tp_size": (["self"], "TunesmithTrainer.compute_loss"),
        "_set_signature_columns_if_needed": (["self"], "PreferenceTrainer (keeps its pair columns)"),
    }
    for name, (names, users) in expected.items():
        assert hasattr(Trainer, name), f"transformers.Trainer.{name} is gone: {users} override or call it"
        assert params(getattr(Trainer, name)) == names, \
            f"Trainer.{name}{inspect.signature(getattr(Trainer, name))} changed: {users} use {names}"


def test_model_accepts_loss_kwargs_decides_whether_training_step_divides_by_accumulation(tiny, args):
    """TunesmithTrainer (True: its loss is already sum / num_items_in_batch) and PreferenceTrainer (False: a per-pair
    mean the Trainer must divide by the accumulation steps) set this attribute after the Trainer's __init__."""
    from transformers import Trainer

    class Constant(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model.lm_head.weight.sum() * 0 + 6.0

    trainer = Constant(model=tiny, args=args)
    trainer.current_gradient_accumulation_steps = 3
    got = {}
    for accepts in (True, False):
        trainer.model_accepts_loss_kwargs = accepts
        got[accepts] = float(trainer.training_step(tiny, {"input_ids": torch.zeros(1, 2, dtype=torch.long)},
                                                   num_items_in_batch=torch.tensor(5)))
    tiny.zero_grad(set_to_none=True)
    assert got == {True: 6.0, False: 2.0}, \
        f"Trainer.training_step no longer scales by model_accepts_loss_kwargs as tunesmith assumes ({got}): " \
        "TunesmithTrainer / PreferenceTrainer set it to choose who normalises the loss"


def test_token_averaging_across_devices_is_the_scaling_tunesmith_mirrors():
    from transformers import Trainer

    in_order(inspect.getsource(Trainer.compute_loss),
             ["self.args.average_tokens_across_devices", "num_items_in_batch is not None",
              "self.accelerator.num_processes // self.get_tp_size()", "self.args.n_gpu <= 1 else self.args.n_gpu"],
             "Trainer.compute_loss's loss scaling", "TunesmithTrainer.compute_loss (a copy of it, for its own loss)")


def test_remove_unused_columns_reads_the_signature_columns(args):
    from datasets import Dataset
    from transformers import Trainer

    class Pairs(Trainer):  # as PreferenceTrainer does
        def _set_signature_columns_if_needed(self):
            self._signature_columns = ["real", "generated"]

    t = Pairs(model=torch.nn.Linear(1, 1), args=dataclasses.replace(args, remove_unused_columns=True))
    kept = t._remove_unused_columns(Dataset.from_dict({"real": [1], "generated": [2], "other": [3]}))
    assert sorted(kept.column_names) == ["generated", "real"], \
        "Trainer._remove_unused_columns no longer keeps _signature_columns: PreferenceTrainer's pair columns " \
        "would be dropped"


def test_the_trainer_reads_its_own_neftune_attribute_not_the_args(tiny, args):
    from transformers import Trainer

    t = Trainer(model=tiny, args=dataclasses.replace(args, neftune_noise_alpha=5.0))
    assert t.neftune_noise_alpha == 5.0, "Trainer.__init__ no longer copies args.neftune_noise_alpha"
    in_order(inspect.getsource(Trainer), ["if self.neftune_noise_alpha is not None", "activate_neftune"],
             "Trainer (its NEFTune hook)",
             "neftune.NEFTuneTrainerMixin (sets the attribute to None so transformers' padded-length hook stays off)")


def test_trainer_attributes_the_recipes_read(tiny, args):
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    t = Trainer(model=tiny, args=args)
    users = "sft/spin/classify run.py, TunesmithTrainer, callbacks.readable_logs"
    for name in ("accelerator", "is_fsdp_enabled", "is_deepspeed_enabled", "callback_handler", "state", "control"):
        assert hasattr(t, name), f"Trainer.{name} is gone: {users} read it"
    assert t.accelerator.num_processes == 1 and t.get_tp_size() == 1
    assert t.is_fsdp_enabled is False and t.is_deepspeed_enabled is False
    for name in ("log_history", "best_model_checkpoint", "best_metric", "global_step", "max_steps",
                 "is_world_process_zero"):
        assert hasattr(t.state, name), f"TrainerState.{name} is gone: {users}, rundir read it"
    assert isinstance(t.pop_callback(PrinterCallback), PrinterCallback), \
        "Trainer.pop_callback(PrinterCallback) (disable_tqdm) no longer returns the callback: callbacks.readable_logs"
    assert callable(t.callback_handler.on_evaluate)


def test_a_checkpoint_writes_trainer_state_last_after_refreshing_stateful_callbacks():
    from transformers import Trainer

    in_order(inspect.getsource(Trainer._save_checkpoint),
             ["self.save_model(", "self._save_optimizer_and_scheduler(", "self._save_rng_state(", "ExportableState",
              "cb.state()", "self.state.save_to_json("],
             "Trainer._save_checkpoint",
             "rundir.checkpoint_problem (trainer_state.json written last marks a whole checkpoint) and "
             "rundir.checkpoint_callback (the fingerprint goes in through an ExportableState callback)")


def test_stateful_callbacks_are_stored_by_class_name_in_trainer_state_json(tmp_path):
    from transformers.trainer_callback import TrainerState

    from tunesmith.rundir import TRAINER_STATE, Fingerprint, checkpoint_callback, checkpoint_fingerprint

    fp, other = Fingerprint.of({"learning_rate": 1e-4}), Fingerprint.of({"learning_rate": 2e-4})
    for callbacks, expected in (([checkpoint_callback(fp)], fp), ([checkpoint_callback(other), checkpoint_callback(fp)],
                                                                   fp)):
        ckpt = tmp_path / f"checkpoint-{len(callbacks)}"
        ckpt.mkdir()
        TrainerState(global_step=1, stateful_callbacks=callbacks).save_to_json(str(ckpt / TRAINER_STATE))
        stamp = checkpoint_fingerprint(ckpt)
        assert stamp is not None and stamp["fingerprint"] == expected.digest, \
            f"TrainerState's stateful_callbacks format changed ({json.loads((ckpt / TRAINER_STATE).read_text())}): " \
            "rundir.checkpoint_fingerprint cannot find the run's fingerprint"


def test_rng_states_are_restored_after_on_train_begin():
    """neftune.seed_rank_stream reseeds rank r > 0 in on_train_begin; a resumed run must then get each rank's saved
    generator state back, which happens only if the Trainer restores RNG states after that event."""
    from transformers import Trainer

    source = inspect.getsource(Trainer)
    callers = set()
    for m in re.finditer(r"\n    def (\w+)\(|self\._load_rng_state\(", source):
        if m.group(1):
            current = m.group(1)
        else:
            callers.add(current)
    assert callers, "Trainer no longer restores RNG states through _load_rng_state"
    loop = inspect.getsource(Trainer._inner_training_loop)
    begin = loop.find("on_train_begin")
    assert begin >= 0, "Trainer._inner_training_loop no longer sends on_train_begin"
    for caller in callers:
        at = loop.find(f"self.{caller}(") if caller != "_inner_training_loop" else loop.find("self._load_rng_state(")
        assert at > begin, f"Trainer restores RNG states ({caller}) before on_train_begin: neftune.seed_rank_stream " \
                           "would overwrite a resumed rank's generator state"


def test_callback_events_reach_callbacks_with_the_keywords_tunesmith_reads(tiny, args):
    from transformers import TrainerCallback, TrainerControl, TrainerState
    from transformers.trainer_callback import CallbackHandler

    seen = {}

    class Recorder(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen["pre_optimizer_model"] = model

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["train_begin_model"] = model

        def on_log(self, args, state, control, logs=None, **kwargs):
            seen["logs"] = logs

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen["metrics"] = metrics

    handler = CallbackHandler([Recorder()], tiny, None, None, None)
    state, control = TrainerState(), TrainerControl()
    handler.on_train_begin(args, state, control)
    handler.on_pre_optimizer_step(args, state, control)
    handler.on_log(args, state, control, {"loss": 1.0})
    handler.on_evaluate(args, state, control, {"eval_loss": 2.0})
    for event in ("on_step_end", "on_save", "on_train_end"):
        assert callable(getattr(handler, event, None)), f"CallbackHandler.{event} is gone: callbacks.py uses it"
    assert seen == {"train_begin_model": tiny, "pre_optimizer_model": tiny, "logs": {"loss": 1.0},
                    "metrics": {"eval_loss": 2.0}}, \
        f"Trainer callback events changed ({seen}): callbacks.DivergenceStop (model= before the optimizer step), " \
        "JsonlMetrics (logs=), NEFTuneCallback (model= at on_train_begin) read them"


def test_the_progress_bar_is_a_tqdm_made_when_training_begins(args):
    from transformers import TrainerControl, TrainerState
    from transformers.trainer_callback import ProgressCallback

    bar = ProgressCallback()
    assert bar.training_bar is None
    bar.on_train_begin(args, TrainerState(max_steps=3), TrainerControl())
    assert callable(getattr(bar.training_bar, "write", None)), \
        "ProgressCallback.training_bar changed: callbacks.ReadableProgressCallback writes log lines through it"
    bar.training_bar.close()


def test_training_arguments_keep_the_keys_tunesmith_reads():
    from transformers import TrainingArguments

    from tunesmith.recipes.training import TRAJECTORY_KEYS

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    read = set(TRAJECTORY_KEYS) | {
        "average_tokens_across_devices", "neftune_noise_alpha", "remove_unused_columns", "ddp_find_unused_parameters",
        "use_cpu", "lr_scheduler_kwargs", "report_to", "disable_tqdm", "per_device_eval_batch_size",
        "metric_for_best_model", "resume_from_checkpoint", "save_strategy", "logging_steps", "save_steps",
        "eval_steps", "eval_delay", "save_total_limit", "eval_accumulation_steps", "torch_empty_cache_steps",
        "dataloader_num_workers", "dataloader_prefetch_factor", "ddp_timeout", "output_dir"}
    assert not read - fields, f"TrainingArguments lost {sorted(read - fields)}: recipes/training.py " \
                              "(check_training_values, TRAJECTORY_KEYS) and the recipes read them"
    for prop in ("n_gpu", "process_index", "world_size", "device", "should_save"):
        assert hasattr(TrainingArguments, prop), f"TrainingArguments.{prop} is gone: the trainers read it"


def test_reporters_are_the_loggers_transformers_knows():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    from tunesmith.recipes.training import REPORTERS

    theirs, ours = set(INTEGRATION_TO_CALLBACK), set(REPORTERS)
    assert ours == theirs, "transformers' report_to loggers changed: update recipes/training.py REPORTERS " \
                           f"(new {sorted(theirs - ours)}, gone {sorted(ours - theirs)})"


def test_get_scheduler_refuses_an_unknown_keyword_with_a_type_error():
    from transformers import get_scheduler

    takes(get_scheduler, ["num_warmup_steps", "num_training_steps", "scheduler_specific_kwargs"],
          "recipes/training.check_scheduler")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises((TypeError, ValueError, KeyError)):  # what check_scheduler turns into a one-line error
        get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10,
                      scheduler_specific_kwargs={"no_such_key": 1})


# ------------------------------------------------------------------------------------------------ transformers models


def test_loading_info_names_missing_unexpected_and_mismatched_weights(tiny_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_dir, vocab_size=50)
    model, info = AutoModelForCausalLM.from_pretrained(tiny_dir, config=config, dtype=torch.float32,
                                                       use_safetensors=True, output_loading_info=True,
                                                       ignore_mismatched_sizes=True)
    assert model.dtype == torch.float32
    assert {"missing_keys", "unexpected_keys", "mismatched_keys"} <= set(info), \
        f"from_pretrained's loading info changed ({sorted(info)}): models.check_loading_info, load_classifier read it"
    shapes = {k[0]: (tuple(k[1]), tuple(k[2])) for k in info["mismatched_keys"] if isinstance(k, tuple) and len(k) == 3}
    assert shapes.get("model.embed_tokens.weight") == ((48, 16), (50, 16)), \
        f"mismatched_keys are no longer (name, checkpoint shape, model shape): {info['mismatched_keys']} " \
        "(models.check_loading_info prints them so)"


def test_the_forward_gives_what_lean_logits_need(tiny):
    ids = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])
    users = "scoring.py (lean logits)"
    with torch.no_grad():
        out = tiny(input_ids=ids, logits_to_keep=1, use_cache=False)
        assert out.logits.shape == (2, 1, 48), f"logits_to_keep=1 no longer projects one position: {users}"
        decoder = tiny.get_decoder()
        hidden = decoder(input_ids=ids).last_hidden_state
        head = tiny.get_output_embeddings()
        torch.testing.assert_close(head(hidden[:, -1:]), out.logits, msg=f"get_decoder/get_output_embeddings: {users}")
        labels = ids.clone()
        full = tiny(input_ids=ids, labels=labels).logits
        summed = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, 48), labels[:, 1:].reshape(-1),
                                                   reduction="sum")
        loss = tiny(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(4)).loss
    torch.testing.assert_close(loss, summed / 4, msg="the model's loss with num_items_in_batch is no longer "
                                                     "sum / num_items_in_batch: scoring.causal_lm_loss's fallback")
    takes(tiny.resize_token_embeddings, ["new_num_tokens", "mean_resizing"], "models.resize_embeddings")


def test_flash_attention_sees_packed_rows_only_in_a_batch_of_one_row(tiny):
    from transformers import AttentionInterface  # noqa: F401  (tests/test_packed_flash.py registers through it)
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask  # noqa: F401
    from transformers.modeling_flash_attention_utils import (_is_packed_sequence,
                                                             prepare_fa_kwargs_from_position_ids)  # noqa: F401
    from transformers.utils.generic import is_flash_attention_requested

    users = "scoring.needs_one_row / one_row (packed rows go to FlashAttention as one row)"
    assert not is_flash_attention_requested(tiny.config)
    for name in ("flash_attention_2", "flash_attention_3", "flash_emulation_for_tests"):
        assert is_flash_attention_requested(requested_attention_implementation=name), f"{name}: {users}"
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    assert bool(_is_packed_sequence(packed, 1)), f"_is_packed_sequence no longer sees one packed row: {users}"
    assert not bool(_is_packed_sequence(packed.repeat(2, 1), 2)), \
        f"transformers now finds packed sequences in a batch of several rows: {users} may no longer be needed " \
        "(check modeling_flash_attention_utils and simplify tunesmith)"


def test_attention_kernel_availability_checks_exist():
    from transformers.utils import import_utils

    for name in ("is_flash_attn_2_available", "is_flash_attn_3_available", "is_torch_flex_attn_available"):
        assert callable(getattr(import_utils, name, None)), \
            f"transformers.utils.import_utils.{name} is gone: config.check_attn_implementation (getattr with a " \
            "False default would call every kernel unavailable) and selftest/checks.py read it"


def test_sequence_classification_mapping_is_where_load_classifier_looks():
    from transformers import LlamaConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    assert LlamaConfig in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, \
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING changed: recipes/classify/trainer.load_classifier checks it"


def test_a_stopping_criterion_stops_rows_one_by_one(tiny):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class FirstRowAfterOneToken(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([True, False])

    ids = torch.tensor([[0, 5, 6], [0, 7, 8]])
    with torch.no_grad():
        out = tiny.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                            pad_token_id=2, eos_token_id=[1], stopping_criteria=StoppingCriteriaList([
                                FirstRowAfterOneToken()]))
    new = out[:, 3:].tolist()
    assert len(new[1]) == 4 and new[0][1:] == [2] * (len(new[0]) - 1), \
        f"a per-row stopping criterion no longer stops only its row ({new}): generate.generate's on_token"


# ------------------------------------------------------------------------------------------------ peft


def test_a_peft_model_forwards_what_tunesmith_reaches_through_it(tiny):
    import copy

    from peft import LoraConfig, get_peft_model

    from tunesmith.models import unwrap_distributed

    base = copy.deepcopy(tiny)
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                 task_type="CAUSAL_LM"))
    users = "neftune.input_embedding_module, scoring (lean logits), plan.py, models.merge_adapter"
    assert unwrap_distributed(peft_model) is peft_model, "a PeftModel now has a .module: models.unwrap_distributed"
    assert peft_model.get_input_embeddings() is base.model.embed_tokens, users
    assert peft_model.get_output_embeddings() is base.lm_head, users
    assert peft_model.get_decoder() is base.model, users
    assert peft_model.get_base_model() is base and hasattr(peft_model, "peft_config"), users
    assert hasattr(peft_model.peft_config["default"], "base_model_name_or_path")
    merged = peft_model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM", f"merge_and_unload no longer returns the base model: {users}"


def test_peft_matches_target_modules_as_check_module_names_assumes(tiny):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from tunesmith.errors import UserError
    from tunesmith.models import check_module_names

    key = "model.layers.0.self_attn.q_proj"
    for target in ("q_proj", "self_attn.q_proj", "model.layers.0.self_attn.q_proj", "_proj", "proj", "attn.q_proj"):
        peft_matches = bool(check_target_module_exists(LoraConfig(target_modules=[target]), key))
        try:
            check_module_names(tiny, [target], None)
            ours = True
        except UserError:
            ours = False
        assert ours == peft_matches, f"target {target!r}: peft matches {peft_matches}, models.check_module_names " \
                                     f"{ours}: peft's matching changed"


def test_all_linear_leaves_the_output_head_out(tiny):
    import copy

    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(copy.deepcopy(tiny), LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    names = {n for n, _ in wrapped.named_modules() if n.endswith("lora_A")}
    assert names and not any("lm_head" in n for n in names), \
        "peft's all-linear now adapts the output head: recipes/classify/trainer._lora_targets and plan.py assume not"


def test_peft_loading_and_kbit_preparation_signatures():
    from peft import PeftModel, prepare_model_for_kbit_training

    assert params(PeftModel.from_pretrained)[:2] == ["model", "model_id"], \
        f"PeftModel.from_pretrained{inspect.signature(PeftModel.from_pretrained)}: models.load_model_and_tokenizer"
    takes(prepare_model_for_kbit_training, ["use_gradient_checkpointing"], "models.wrap_lora (QLoRA)")


# ------------------------------------------------------------------------------------------------ accelerate, torch


def test_distributed_saving_pieces():
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: F401
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel  # noqa: F401

    assert DistributedType.DEEPSPEED.value == "DEEPSPEED", "models.gathered_state_dict compares with 'DEEPSPEED'"
    assert callable(Accelerator.get_state_dict), "models.gathered_state_dict (DeepSpeed)"
    StateDictOptions(full_state_dict=True, cpu_offload=True)  # models.gathered_state_dict
    grads = [torch.tensor([3.0]), torch.tensor([float("nan")])]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)
    assert not torch.isfinite(norm), "callbacks._finite_grad_norm: get_total_norm must report a NaN, not raise"


# ------------------------------------------------------------------------------------------------ datasets


def test_datasets_pieces_the_data_cache_uses(tmp_path):
    import datasets
    from datasets import Dataset, Features, List, Value, concatenate_datasets
    from datasets.fingerprint import Hasher

    assert isinstance(Hasher.hash({"a": 1}), str), "data/prepare._fingerprint hashes a slow tokenizer with Hasher"
    assert isinstance(datasets.config.HF_DATASETS_CACHE, (str, type(tmp_path))), "data/source.cache_root"
    features = Features({"input_ids": List(Value("int32")), "loc": Value("string")})
    path = tmp_path / "rows.arrow"
    built = Dataset.from_dict({"input_ids": [[1, 2]], "loc": ["f:1"]}, features=features)
    built.map(lambda b: b, batched=True, cache_file_name=str(path))
    parts = [Dataset.from_file(str(path))] * 2
    both = concatenate_datasets(parts)
    assert both["input_ids"] == [[1, 2], [1, 2]], "data/prepare.load_cached (Dataset.from_file + concatenate_datasets)"


# ------------------------------------------------------------------------------------------------ lm-eval


def test_lm_eval_calls_the_loglikelihood_tokens_that_lean_hflm_overrides(tiny_model_dir):
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from tunesmith.evaluation.lm_eval_bridge import _lean
    from tunesmith.models import load_model_and_tokenizer

    users = "evaluation/lm_eval_bridge.py (LeanHFLM)"
    assert issubclass(HFLM, TemplateLM)
    assert params(HFLM._loglikelihood_tokens) == ["self", "requests", "disable_tqdm", "override_bs"], \
        f"HFLM._loglikelihood_tokens{inspect.signature(HFLM._loglikelihood_tokens)} changed: {users} overrides it"
    takes(HFLM.__init__, ["pretrained", "tokenizer", "batch_size", "device"], users)
    takes(TaskManager.__init__, ["include_path", "include_defaults"], "lm_eval_bridge.run_tasks")
    assert "all_tasks" in dir(TaskManager), "TaskManager.all_tasks: lm_eval_bridge.run_tasks checks names with it"
    takes(lm_eval.simple_evaluate, ["model", "tasks", "num_fewshot", "limit", "task_manager", "apply_chat_template",
                                    "bootstrap_iters", "log_samples", "random_seed", "numpy_random_seed",
                                    "torch_random_seed", "fewshot_random_seed"], "lm_eval_bridge.run_tasks")

    seen = []

    class Spy(_lean(HFLM)):
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            seen.extend(requests)
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    lm = Spy(pretrained=model, tokenizer=tok, batch_size=2, device="cpu")
    for name in ("backend", "max_length", "batch_size", "tokenizer", "device", "cache_hook"):
        assert hasattr(lm, name), f"HFLM.{name} is gone: {users} reads it"
    assert lm.backend == "causal"
    out = lm.loglikelihood([Instance("loglikelihood", {}, ("the cat", " sat"), 0)], disable_tqdm=True)
    assert len(seen) == 1 and seen[0][0] == ("the cat", " sat") and all(isinstance(x, int) for x in seen[0][1] +
                                                                         seen[0][2]), \
        f"TemplateLM.loglikelihood no longer hands _loglikelihood_tokens ((context, continuation), ids, ids): {seen}"
    assert isinstance(out[0][0], float) and isinstance(out[0][1], bool)


# ------------------------------------------------------------------------------------------------ trl, vllm (optional)


def test_trl_trainers_take_callbacks_as_neftune_callback_documents():
    pytest.importorskip("trl")
    from trl import DPOTrainer, SFTConfig, SFTTrainer

    users = "neftune.NEFTuneCallback (its documented use), selftest/checks.py _trl_step_memory"
    takes(SFTTrainer.__init__, ["model", "args", "processing_class", "train_dataset", "callbacks"], users)
    takes(DPOTrainer.__init__, ["model", "args", "processing_class", "train_dataset", "callbacks"], users)
    assert "max_length" in {f.name for f in dataclasses.fields(SFTConfig)}, users


def test_vllm_takes_what_generate_vllm_passes():
    vllm = pytest.importorskip("vllm")

    takes(vllm.LLM.__init__, ["model", "tokenizer", "seed", "dtype", "load_format", "trust_remote_code"],
          "generate.generate_vllm")
    params_ = vllm.SamplingParams(max_tokens=4, min_tokens=0, repetition_penalty=1.0, stop_token_ids=[1],
                                  temperature=0.0, top_p=1.0, top_k=-1, seed=3)
    assert params_.seed == 3, "generate.generate_vllm gives every request its own seed"
