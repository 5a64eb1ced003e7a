import copy
import logging
import os

from distft.strategies.base import Strategy, register_strategy

log = logging.getLogger(__name__)


HEAD_CONFIG = "head_config.json"


@register_strategy("lora")
class LoraStrategy(Strategy):
    """peft LoRA adapters on the target modules; a classification head stays trainable
    (peft's SEQ_CLS and TOKEN_CLS tasks keep `classifier`/`score` in modules_to_save, so the adapter
    file carries it). On distft's own head models (`backbone` + declared heads) the
    adapters go on the backbone and the heads train whole."""

    exports_adapter = True

    def transform(self, model, task):
        # peft is imported here, not at the top: it imports a good part of transformers
        # (seconds per process), which runs of the other strategies do not need.
        from peft import LoraConfig, TaskType, get_peft_model

        targets = self.cfg.target_modules
        if targets is not None:
            targets = list(targets)
            if targets == ["all-linear"]:
                targets = "all-linear"
        kwargs = dict(r=self.cfg.r, lora_alpha=self.cfg.alpha, lora_dropout=self.cfg.dropout,
                      target_modules=targets)
        if getattr(model, "distft_heads", None):
            model.backbone = get_peft_model(model.backbone, LoraConfig(**kwargs, task_type=TaskType.FEATURE_EXTRACTION))
            self._freeze_a(model.backbone)
            return model
        task_type = {"label": TaskType.SEQ_CLS, "token_labels": TaskType.TOKEN_CLS}.get(task.predicts,
                                                                                         TaskType.CAUSAL_LM)
        model = get_peft_model(model, LoraConfig(**kwargs, task_type=task_type))
        self._freeze_a(model)
        return model

    def _freeze_a(self, model) -> None:
        """strategy.train_a=false: the down-projections A stay as peft initialised them
        (seeded, so a resumed run rebuilds the same ones; the exported adapter carries them)."""
        if self.cfg.train_a:
            return
        frozen = 0
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_embedding_A." in name:
                p.requires_grad_(False)
                frozen += p.numel()
        log.info("strategy lora: train_a=false, %s parameters of A frozen at their init (only B trains)",
                 f"{frozen:,}")

    def export(self, model, out_dir, base_dir):
        if base_dir is not None:
            # Point the adapter at the base weights this run used (a saved copy when the
            # base was built from a config or converted from GGUF).
            for cfg in model.peft_config.values():
                cfg.base_model_name_or_path = os.path.abspath(base_dir)
        model.save_pretrained(out_dir, safe_serialization=True)
        task_model = model.get_base_model()
        if getattr(task_model.config, "id2label", None) and not getattr(task_model, "distft_heads", None):
            # The adapter's head (modules_to_save) has the task's label count, which the
            # base folder's config may not say: keep the task model's config beside it, so
            # AutoModelFor...Classification.from_pretrained(base, config=<this>) builds the
            # head the adapter fits (and names the labels).
            task_model.config.to_json_file(os.path.join(out_dir, HEAD_CONFIG))
        written = [out_dir]
        if self.cfg.merge_on_export:
            merged = copy.deepcopy(model).merge_and_unload()
            written.append(os.path.join(out_dir, "merged"))
            merged.save_pretrained(written[-1], safe_serialization=True)
        return written
