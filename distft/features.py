"""The feature-based approach (strategy=feature): frozen embeddings + a scikit-learn classifier.

    distft-train model=minilm task=classification strategy=feature data=files \
        data.train=train.jsonl data.validation=validation.jsonl

A recipe, not a gradient loop: the data is prepared as for training (same cleaning, same
cache); the frozen model embeds every example (sorted by length so batches hold little
padding, `inference_mode`, split across ranks under torchrun and gathered on rank 0); the
embeddings are cached on disk as safetensors, keyed by model, data, pooling, layers and
max length, so a second classifier on the same data embeds nothing; rank 0 fits the
classifier (cross-validating C, or alpha for the MLP, when given a list) and scores the
validation split with the task's own metrics.

Export (final/): a linear classifier or an MLP becomes the model's classification head, so
final/ loads with plain transformers and gives the probabilities scikit-learn gave
(sequence tasks: distft's MlpHead model, whose pooling and layer choice no stock head has,
so it loads with trust_remote_code=True; token tasks: a stock AutoModelForTokenClassification
when the features are the last layer's). Any other classifier is saved with skops beside
the frozen model (final/classifier.skops, final/backbone/), never as a pickle; loading it
(`distft-predict`) reviews the types skops does not trust by default.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import OmegaConf

from distft.errors import ConfigError
from distft.recipes import RECIPES, Recipe

log = logging.getLogger("distft")

FEATURE_CACHE_VERSION = 1


def feature_layers(strategy_cfg) -> Optional[List[int]]:
    """Indices into the model's hidden_states to average; None = the last layer's output."""
    if strategy_cfg.last_k > 1:
        return list(range(-strategy_cfg.last_k, 0))
    if strategy_cfg.layer != -1:
        return [int(strategy_cfg.layer)]
    return None


# ---------------------------------------------------------------------- embedding
def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if pooling == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if pooling == "first":
        return hidden[:, 0]
    last = attention_mask.sum(1).long() - 1  # right padding: the last real token
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


def hidden_of(outputs, layers: Optional[List[int]]) -> torch.Tensor:
    """The hidden states features are read from: the last layer's, or the mean of `layers`."""
    if not layers:
        return outputs.last_hidden_state
    return torch.stack([outputs.hidden_states[i] for i in layers]).mean(0)


@torch.inference_mode()
def embed(backbone, examples: List[Dict], collate, *, batch_size: int, pooling: str, layers: Optional[List[int]],
          device, autocast, per_word: bool = False, rank: int = 0, world_size: int = 1) -> Dict[int, torch.Tensor]:
    """This rank's share of the embeddings: {example index: features}. Examples go longest
    first in batches of similar length (as sentence-transformers' encode orders them);
    rank r takes every world_size-th batch of that order. `per_word`: one row per word,
    its first sub-token's vector (zeros for a word truncation cut off)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)][rank::world_size]
    out: Dict[int, torch.Tensor] = {}
    for idx in batches:
        batch = collate([examples[i] for i in idx])
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with autocast:
            res = backbone(input_ids=ids, attention_mask=mask, output_hidden_states=bool(layers))
        hidden = hidden_of(res, layers).float()
        if per_word:
            pos = batch["word_pos"].to(device)
            rows = hidden.gather(1, pos.clamp(min=0).unsqueeze(-1).expand(-1, -1, hidden.size(-1)))
            rows = rows * (pos >= 0).unsqueeze(-1)
            for j, i in enumerate(idx):
                out[i] = rows[j, : len(examples[i]["word_pos"])].cpu()
        else:
            feats = pool(hidden, mask, pooling).cpu()
            for j, i in enumerate(idx):
                out[i] = feats[j]
    return out


def gather_features(share: Dict[int, torch.Tensor], n: int, backend) -> Optional[List[torch.Tensor]]:
    """Every rank's share on rank 0, in example order (None on the other ranks)."""
    shares = backend.gather_object(share) if backend.world_size > 1 else [share]
    if not backend.is_main:
        return None
    merged: Dict[int, torch.Tensor] = {}
    for s in shares:
        merged.update(s)
    assert len(merged) == n, f"gathered {len(merged)} of {n} embeddings"
    return [merged[i] for i in range(n)]


def feature_cache_key(cfg, data_key: str, layers, precision: str) -> str:
    from distft.data.cache import _file_digest
    from distft.models.loading import resolve_model_path

    path = resolve_model_path(cfg.model)
    parts = {
        "version": FEATURE_CACHE_VERSION,
        "data": data_key,  # files, tokenizer, every data and task setting, max length, seed
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "model_files": _file_digest(path) if path and os.path.isdir(path) else None,
        "seed": cfg.seed,  # a model built from a config is initialised from it
        "pooling": cfg.strategy.pooling,
        "layers": layers,
        "precision": precision,  # what ran (auto resolved): bf16 features differ from fp32 ones
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def save_features(path: Path, splits: Dict[str, List[torch.Tensor]]) -> None:
    """One safetensors file: per split, the rows of every example concatenated, and each
    example's row count (1 for a pooled example, its words for a token task)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, rows in splits.items():
        tensors[name] = torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]).contiguous()
        tensors[f"{name}.rows"] = torch.tensor([r.reshape(-1, r.shape[-1]).shape[0] for r in rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def load_features(path: Path, per_word: bool) -> Dict[str, List[torch.Tensor]]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    out = {}
    for name in ("train", "validation"):
        rows = tensors[name].split(tensors[f"{name}.rows"].tolist())
        out[name] = list(rows) if per_word else [r[0] for r in rows]
    return out


# ---------------------------------------------------------------------- classifiers
def build_classifier(c, seed: int, search_scoring: str):
    """A scikit-learn pipeline (optional standardisation, then the classifier) and, when
    C (logistic, svm) or alpha (mlp) is a list, the grid searched by cross-validation."""
    from hydra.utils import get_class
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    params = dict(OmegaConf.to_container(c.params, resolve=True))
    grid: Dict[str, list] = {}

    def value(key, v):
        v = OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
        if isinstance(v, (list, tuple)):
            if len(v) > 1:
                grid[f"clf__{key}"] = list(v)
            return v[0]
        return v

    if c._target_:
        try:
            cls = get_class(c._target_)
        except Exception as e:
            raise ConfigError(f"strategy.classifier._target_={c._target_}: cannot import it ({e})") from None
        est = cls(**{k: value(k, v) for k, v in params.items()})
    elif c.name == "logistic":
        est = LogisticRegression(C=value("C", c.C), max_iter=c.max_iter, class_weight=c.class_weight,
                                 random_state=seed, **params)
    elif c.name == "svm":
        est = LinearSVC(C=value("C", c.C), max_iter=c.max_iter, class_weight=c.class_weight, random_state=seed,
                        **params)
    else:
        est = MLPClassifier(hidden_layer_sizes=tuple(c.hidden), activation=c.activation, alpha=value("alpha", c.alpha),
                            early_stopping=c.early_stopping, max_iter=c.max_iter, random_state=seed, **params)
    pipe = Pipeline(([("scale", StandardScaler())] if c.standardize else []) + [("clf", est)])
    if not grid:
        return pipe, None
    cv = StratifiedKFold(n_splits=c.cv, shuffle=True, random_state=seed)
    return GridSearchCV(pipe, grid, cv=cv, scoring=c.scoring or search_scoring, n_jobs=c.n_jobs, refit=True), grid


def class_scores(fitted, X: np.ndarray, num_labels: int) -> np.ndarray:
    """[n, num_labels] scores whose softmax is the classifier's probabilities (log
    probabilities; a classifier without them gives its decision function). Classes absent
    from the training data score -1e4."""
    clf = fitted
    if hasattr(clf, "predict_proba"):
        with np.errstate(divide="ignore"):
            scores = np.log(np.clip(clf.predict_proba(X), 1e-300, None))
    else:
        d = clf.decision_function(X)
        scores = np.stack([np.zeros_like(d), d], 1) if d.ndim == 1 else d
    out = np.full((X.shape[0], num_labels), -1e4, dtype=np.float64)
    out[:, np.asarray(clf.classes_, dtype=int)] = scores
    return out


def as_layers(pipe) -> Optional[Tuple[List[Tuple[np.ndarray, np.ndarray]], str, np.ndarray]]:
    """The fitted pipeline as dense layers [(W [out, in], b)], the hidden activation and the
    classes, with standardisation folded into the first layer; None when the classifier is
    not one a head can be (not linear, not an MLP)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import LinearSVC

    clf = pipe.named_steps["clf"]
    if isinstance(clf, (LogisticRegression, LinearSVC)):
        layers = [(clf.coef_.astype(np.float64), np.atleast_1d(clf.intercept_).astype(np.float64))]
        activation = "identity"
        binary_single = layers[0][0].shape[0] == 1
    elif isinstance(clf, MLPClassifier):
        layers = [(W.T.astype(np.float64), b.astype(np.float64)) for W, b in zip(clf.coefs_, clf.intercepts_)]
        activation = clf.activation
        binary_single = clf.out_activation_ == "logistic"
    else:
        return None
    if "scale" in pipe.named_steps:  # W (x - mu) / sigma + b = (W / sigma) x + (b - W mu / sigma)
        scaler = pipe.named_steps["scale"]
        W, b = layers[0]
        W2 = W / scaler.scale_
        layers[0] = (W2, b - W2 @ scaler.mean_)
    if binary_single:  # one logit z for classes_[1]: logits (0, z) give softmax = sigmoid(z)
        W, b = layers[-1]
        layers[-1] = (np.concatenate([np.zeros_like(W), W]), np.concatenate([np.zeros_like(b), b]))
    return layers, activation, np.asarray(clf.classes_, dtype=int)


def _load_head(linears: List[torch.nn.Linear], layers, classes, num_labels: int) -> None:
    """Copy dense layers into torch Linears; the output rows follow the class ids."""
    with torch.no_grad():
        for k, (lin, (W, b)) in enumerate(zip(linears, layers)):
            if k == len(layers) - 1:
                W_full = np.zeros((num_labels, W.shape[1]))
                b_full = np.full(num_labels, -1e4)
                W_full[classes], b_full[classes] = W, b
                W, b = W_full, b_full
            lin.weight.copy_(torch.from_numpy(W))
            lin.bias.copy_(torch.from_numpy(b))


# ---------------------------------------------------------------------- the recipe
@RECIPES.register("feature")
class FeatureRun(Recipe):
    """Embed with the frozen model, fit a scikit-learn classifier, score and export."""

    def setup(self):
        from distft import precision as precisions
        from distft.backends import build_backend
        from distft.data.cache import cache_key, prepared_once
        from distft.models import load_tokenizer
        from distft.models.loading import resolve_model_path
        from distft.tasks import build_run_task
        from distft.trainer import check_config, seed_everything

        cfg = self.cfg
        check_config(cfg)
        for axis in ("privacy", "regularizer"):
            if cfg[axis].name != "none":
                raise ConfigError(f"strategy=feature with {axis}={cfg[axis].name}: nothing is trained by gradient "
                                  f"here (a frozen model embeds, scikit-learn fits); set {axis}=none")
        if cfg.data.name == "mixture":
            raise ConfigError("strategy=feature fits one classifier on one dataset; data=mixture is for training "
                              "a shared encoder (run one feature run per task)")
        if cfg.backend.name not in ("single", "ddp"):
            raise ConfigError(f"strategy=feature with backend={cfg.backend.name}: the frozen model embeds on every "
                              "process whole; use backend=single, or backend=ddp under torchrun to split the data")
        self.precision = precisions.resolve(cfg.trainer.precision)
        self.backend = build_backend(cfg.backend, cfg.trainer, self.precision)
        self.backend.setup()
        cfg.run_dir = self.backend.broadcast_object(str(cfg.run_dir))
        self.run_dir = Path(cfg.run_dir)
        if (self.run_dir / "summary.json").exists():
            raise ConfigError(f"run_dir={self.run_dir} already holds a finished run; choose another run_dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)

        self.tokenizer = load_tokenizer(cfg.model, resolve_model_path(cfg.model))
        self.task = build_run_task(cfg, self.tokenizer)
        self.data_key = cache_key(cfg.data, cfg.task, self.tokenizer, cfg.seed)
        folder = Path(cfg.data.cache_dir).expanduser() / self.data_key if cfg.data.cache_dir else None
        (self.train_examples, self.val_examples, self.num_labels, report), hit = prepared_once(
            folder, lambda: self.task.prepare(cfg.seed), self.backend)
        for line in self.task.prepared(self.num_labels, report):
            log.info("%s%s", line, f" (cached in {folder})" if hit else "")
        if self.backend.is_main:
            (self.run_dir / "data_report.json").write_text(json.dumps(report, indent=2))
        self.model = self.task.build_model(cfg.model, self.tokenizer, self.num_labels, cfg.seed)
        self.model.requires_grad_(False)
        self.model.eval()
        self.backbone = self.model.base_model.to(self.backend.device)
        self.per_word = self.task.predicts == "token_labels"
        self.layers = feature_layers(cfg.strategy)
        return self

    # ------------------------------------------------------------ features
    def features(self) -> Tuple[Optional[Dict[str, List[torch.Tensor]]], Dict]:
        """(the train and validation features on rank 0, how they were got)."""
        cfg, s = self.cfg, self.cfg.strategy
        path = None
        if s.cache_dir:
            key = feature_cache_key(cfg, self.data_key, self.layers, self.precision.name)
            path = Path(s.cache_dir).expanduser() / f"{key}.safetensors"
        hit = path is not None and path.is_file()
        info: Dict = {"cache": str(path) if path else None, "cache_hit": hit}
        if hit:
            log.info("features: read from the cache %s", path)
            return (load_features(path, self.per_word) if self.backend.is_main else None), info
        started = time.perf_counter()
        splits: Dict[str, List[torch.Tensor]] = {}
        tokens = 0
        for name, examples in (("train", self.train_examples), ("validation", self.val_examples)):
            share = embed(self.backbone, examples, self.task.collate, batch_size=s.batch_size, pooling=s.pooling,
                          layers=self.layers, device=self.backend.device,
                          autocast=self.precision.autocast(self.backend.device.type), per_word=self.per_word,
                          rank=self.backend.rank, world_size=self.backend.world_size)
            splits[name] = gather_features(share, len(examples), self.backend)
            tokens += sum(len(e["input_ids"]) for e in examples)
        seconds = time.perf_counter() - started
        n = len(self.train_examples) + len(self.val_examples)
        info.update({"embed_seconds": seconds, "examples_per_second": n / seconds, "tokens_per_second": tokens / seconds})
        log.info("features: %d examples embedded in %.1f s (%.1f examples/s over %d process(es))", n, seconds,
                 n / seconds, self.backend.world_size)
        if self.backend.is_main and path is not None:
            save_features(path, splits)
        self.backend.barrier()
        return (splits if self.backend.is_main else None), info

    def _design(self, rows: List[torch.Tensor], examples: List[Dict]) -> Tuple[np.ndarray, np.ndarray]:
        """(X, y) for scikit-learn: one row per example, or per word that the input kept."""
        if not self.per_word:
            return torch.stack(rows).numpy(), np.array([e["label"] for e in examples])
        X = torch.cat(rows).numpy()
        y = np.array([t for e in examples for t in e["word_tags"]])
        keep = np.array([p >= 0 for e in examples for p in e["word_pos"]])
        return X[keep], y[keep]

    # ------------------------------------------------------------ run
    def run(self) -> Dict:
        from distft.metrics import MetricsLogger

        cfg = self.cfg
        splits, info = self.features()
        summary = None
        if self.backend.is_main:
            metrics_log = MetricsLogger(cfg.logger, self.run_dir, True, OmegaConf.to_container(cfg, resolve=True))
            metrics_log.start(None)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            summary = self._fit_and_export(splits, info, metrics_log)
        summary = self.backend.broadcast_object(summary)
        return summary

    def _fit_and_export(self, splits, info, metrics_log) -> Dict:
        import skops.io as sio

        cfg, c = self.cfg, self.cfg.strategy.classifier
        X, y = self._design(splits["train"], self.train_examples)
        Xv, yv = self._design(splits["validation"], self.val_examples)
        scoring = "f1_macro" if self.per_word else "accuracy"
        model, grid = build_classifier(c, cfg.seed, scoring)
        started = time.perf_counter()
        model.fit(X, y)
        fit_seconds = time.perf_counter() - started
        pipe = model.best_estimator_ if grid else model
        search = None
        if grid:
            search = {"grid": grid, "best": {k.split("__", 1)[1]: v for k, v in model.best_params_.items()},
                      f"cv_{model.scoring}": float(model.best_score_), "folds": c.cv}
            log.info("classifier: %s chosen by %d-fold cross-validation (%s %.4f)", search["best"], c.cv,
                     model.scoring, model.best_score_)
        name = c._target_ or c.name
        log.info("classifier %s fitted on %d x %d features in %.1f s", name, X.shape[0], X.shape[1], fit_seconds)
        metrics = self._score(pipe, splits["validation"])
        sio.dump(pipe, self.run_dir / "classifier.skops")
        final = self.run_dir / "final"
        exported_as = self._export(pipe, final)
        event = {"step": 0, **{f"eval/{k}": v for k, v in metrics.items()}}
        metrics_log.log(event)
        summary = {
            "steps": 0, "exported_step": 0, "best_step": None, "best_metric": None, "stopped_early": False,
            "metric": cfg.task.metric, **{f"eval/{k}": v for k, v in metrics.items()},
            "classifier": name, "search": search, "exported_as": exported_as, "features": {
                **info, "dim": int(X.shape[1]), "train_rows": int(X.shape[0]), "validation_rows": int(Xv.shape[0]),
                "pooling": None if self.per_word else cfg.strategy.pooling, "layers": self.layers},
            "fit_seconds": fit_seconds, "trainable_params": 0,
            "total_params": sum(p.numel() for p in self.model.parameters()),
            "backend": self.backend.name, "processes": self.backend.world_size, "precision": self.precision.name,
            "final_dir": str(final), "run_dir": str(self.run_dir),
            "objective": metrics.get(cfg.task.metric),
            "objective_direction": "maximize" if cfg.task.greater_is_better else "minimize",
            "artifacts": {"weights": None, "classifier": str(self.run_dir / "classifier.skops")},
        }
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        os.replace(tmp, self.run_dir / "summary.json")
        metrics_log.finish(summary)
        return summary

    def _score(self, pipe, rows: List[torch.Tensor]) -> Dict[str, float]:
        """Validation metrics through the task's own eval_stats/finish_eval (the same
        definitions as a trained model's), with the classifier's scores as logits."""
        sums: Dict[str, float] = {}
        bs = 256
        for i in range(0, len(self.val_examples), bs):
            chunk = self.val_examples[i:i + bs]
            batch = self.task.collate(chunk)
            if self.per_word:
                logits = torch.zeros(*batch["input_ids"].shape, self.num_labels, dtype=torch.float64)
                labels = torch.full_like(batch["labels"], -100)
                for j, e in enumerate(chunk):
                    scores = torch.from_numpy(class_scores(pipe, rows[i + j].numpy(), self.num_labels))
                    for w, pos in enumerate(e["word_pos"]):
                        if pos >= 0:
                            logits[j, pos] = scores[w]
                            labels[j, pos] = e["word_tags"][w]
                batch["labels"] = labels  # the loss over words, as the classifier saw them
            else:
                X = torch.stack(rows[i:i + bs]).numpy()
                logits = torch.from_numpy(class_scores(pipe, X, self.num_labels))
            for k, v in self.task.eval_stats(logits, batch).items():
                sums[k] = sums.get(k, 0.0) + v
        keys = self.task.eval_stats_keys
        return self.task.finish_eval({k: sums.get(k, 0.0) for k in keys})

    # ------------------------------------------------------------ export
    def _export(self, pipe, final: Path) -> str:
        from distft import checkpoint as ckpt

        tmp = ckpt.atomic_dir(final)
        layers = as_layers(pipe)
        if self.per_word:
            kind = self._export_token_head(pipe, layers, tmp)
        else:
            kind = self._export_pooled_head(layers, tmp)
        if kind == "skops":
            self._export_skops(pipe, tmp)
        self.tokenizer.save_pretrained(tmp)
        ckpt.commit_dir(tmp, final)
        log.info("exported to %s (%s)", final, kind)
        return kind

    def _export_pooled_head(self, layers, out: Path) -> str:
        from distft.models.head_model import MlpHeadConfig, MlpHeadForSequenceClassification

        if layers is None:
            return "skops"
        dense, activation, classes = layers
        s = self.cfg.strategy
        config = MlpHeadConfig(backbone=self.backbone.config, head_hidden=[W.shape[0] for W, _ in dense[:-1]],
                               head_dropout=0.0, pooling=s.pooling, num_labels=self.num_labels, activation=activation,
                               feature_layers=self.layers, pad_token_id=self.tokenizer.pad_token_id)
        model = MlpHeadForSequenceClassification(config, backbone=self.backbone.cpu())
        _load_head([m for m in model.head if isinstance(m, torch.nn.Linear)], dense, classes, self.num_labels)
        model.save_pretrained(out, safe_serialization=True)
        return "head (MlpHeadForSequenceClassification, trust_remote_code=True)"

    def _export_token_head(self, pipe, layers, out: Path) -> str:
        model = self.model.cpu()
        head = getattr(model, "classifier", None) or getattr(model, "score", None)
        fits = (layers is not None and len(layers[0]) == 1 and self.layers is None
                and isinstance(head, torch.nn.Linear) and head.bias is not None)
        if not fits:
            return "skops"
        dense, _, classes = layers
        _load_head([head], dense, classes, self.num_labels)
        model.save_pretrained(out, safe_serialization=True)
        return f"head ({type(model).__name__})"

    def _export_skops(self, pipe, out: Path) -> None:
        import skops.io as sio

        sio.dump(pipe, out / "classifier.skops")
        self.backbone.cpu().save_pretrained(out / "backbone", safe_serialization=True)
        labels = getattr(self.task, "label_names", None) or list(range(self.num_labels))
        (out / "features.json").write_text(json.dumps({
            "task": self.task.predicts, "pooling": self.cfg.strategy.pooling, "layers": self.layers,
            "max_length": self.cfg.data.max_length, "labels": labels, "num_labels": self.num_labels,
            "subtoken_labels": self.cfg.task.subtoken_labels}, indent=2))

    def cleanup(self):
        self.backend.teardown()
