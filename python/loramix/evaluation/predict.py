"""Predictions of many adapters on one base model in one batched greedy generation (PEFT
mixed-adapter batches): what the leave-one-out run and the demo score."""
from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence




@contextmanager
def quiet_hf():
    """No transformers progress bars or version-migration FutureWarnings on our output."""
    tl = None
    try:
        from transformers.utils import logging as tl

        was = tl.is_progress_bar_enabled()
        tl.disable_progress_bar()
    except ImportError:   # pragma: no cover
        pass
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")
            warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
            yield
    finally:
        if tl is not None and was:
            tl.enable_progress_bar()


def load_base(path, threads=None):
    from loramix.evaluation.generation import load_base as _load

    with quiet_hf():
        return _load(path, threads=threads)


def generate_mixed(model, tok, prompts: Sequence[str], adapter_names: Sequence[str] | None = None, *,
                   max_new_tokens: int = 24, max_prompt_tokens: int = 512,
                   batch_size: int = 512) -> list[str]:
    """Greedy continuations (:func:`loramix.evaluation.generation.generate`), each prompt through its own
    adapter of a PeftModel (``adapter_names``, ``"__base__"`` for the bare model), so many
    systems share one decoding loop. The eval harness's defaults: short answers, big batches."""
    from loramix.evaluation.generation import generate

    return generate(model, tok, prompts, max_new_tokens=max_new_tokens,
                    max_prompt_tokens=max_prompt_tokens, batch_size=batch_size,
                    adapter_names=adapter_names)


def _adapter_config(folder) -> dict:
    cfg = json.loads((Path(folder) / "adapter_config.json").read_text())
    for k in ("base_model_name_or_path", "revision", "inference_mode"):
        cfg.pop(k, None)
    return cfg


class AdapterSet:
    """A base model with named adapter slots, for scoring many adapters with one model.

    :meth:`predict` attaches the given adapters (name → folder) and generates for every one of
    them (and the base model) in mixed-adapter batches. Slots stay attached between calls: an
    adapter whose config equals its slot's has only its tensors copied in (PEFT's
    ``load_adapter`` re-walks the whole model per adapter, which costs more than generating on
    a small model); otherwise the slot is loaded afresh. :meth:`close` removes every LoRA layer
    and returns the plain base model."""

    def __init__(self, model):
        self.model = model
        self.pm = None
        self.slots: dict[str, tuple[str, dict]] = {}
        self._count = 0

    def _n_tensors(self, an: str) -> int:
        return sum(1 for n, _ in self.pm.named_parameters()
                   if n.endswith(f".{an}.weight") and (".lora_A." in n or ".lora_B." in n))

    def _attach(self, name: str, folder) -> str:
        from peft import PeftModel, set_peft_model_state_dict
        from safetensors.torch import load_file

        cfg = _adapter_config(folder)
        slot = self.slots.get(name)
        if slot is not None and slot[1] == cfg:
            an = slot[0]
            sd = load_file(str(Path(folder) / "adapter_model.safetensors"))
            try:
                if len(sd) == self._n_tensors(an):   # every tensor of the slot is replaced
                    set_peft_model_state_dict(self.pm, sd, adapter_name=an)
                    return an
            except RuntimeError:   # shapes differ after all: load afresh
                pass
        if slot is not None:
            self.pm.delete_adapter(slot[0])
            del self.slots[name]
        self._count += 1
        an = f"a{self._count}"   # plain module keys
        if self.pm is None:
            self.pm = PeftModel.from_pretrained(self.model, str(folder), adapter_name=an, is_trainable=False)
        else:
            self.pm.load_adapter(str(folder), adapter_name=an, is_trainable=False)
        self.slots[name] = (an, cfg)
        return an

    def predict(self, tok, examples: Sequence[dict], adapters: dict, *, with_base: bool = True,
                **gen_kw) -> dict[str, list[str]]:
        prompts = [e["input"] for e in examples]
        names = (["base"] if with_base else []) + list(adapters)
        with quiet_hf():
            if not adapters and self.pm is None:
                out = generate_mixed(self.model, tok, prompts, None, **gen_kw)
            else:
                peft_names = {name: self._attach(name, folder) for name, folder in adapters.items()}
                rows, an_rows = [], []
                for name in names:
                    rows += prompts
                    an_rows += [peft_names.get(name, "__base__")] * len(prompts)
                out = generate_mixed(self.pm, tok, rows, an_rows, **gen_kw)
        n = len(prompts)
        return {name: out[k * n:(k + 1) * n] for k, name in enumerate(names)}

    def close(self):
        if self.pm is not None:
            with quiet_hf():
                self.model = self.pm.unload()   # LoRA layers out again: the plain base model
            self.pm = None
            self.slots.clear()
        return self.model


def predict_systems(model, tok, examples: Sequence[dict], adapters: dict, *, with_base: bool = True,
                    **gen_kw):
    """Predictions of the base model (key ``"base"`` if ``with_base``) and of each adapter
    folder in ``adapters`` (name → folder) on ``examples``, in one mixed-adapter generation.
    Returns ``(predictions by name, model)``: the model as it was, adapters removed again."""
    aset = AdapterSet(model)
    try:
        preds = aset.predict(tok, examples, adapters, with_base=with_base, **gen_kw)
    finally:
        model = aset.close()
    return preds, model
