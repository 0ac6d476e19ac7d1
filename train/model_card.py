"""The model card (README.md) of an export: Hugging Face front matter, how to load the model (and, for a run with
CUSA's reference heads, that stock open_clip loading yields the towers without them), what it was trained on, with
which loss and teachers, for how long, and its recalls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from train.exported import HEADS_FILE
from train.metrics_log import read_records

_RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def model_card_facts(run: Path, checkpoint: Path, ckpt: dict, config: dict, student, test: dict | None
                     ) -> dict[str, Any]:
    """What the model card states, gathered from the run folder, its checkpoint ``ckpt`` (read from ``checkpoint``),
    the run's configuration, the student and its teacher store; ``test``: recalls measured at export, if any."""
    epoch = int(ckpt.get("epoch", 0))
    summary = _read_json(run / "summary.json") or {}
    return {
        "student": config["student"], "arch": student.arch, "pretrained": student.pretrained,
        "cross_head": config.get("cross_head", "reference"), "embed_dim": student.embed_dim,
        "data": config.get("data"), "split": config.get("split"), "val_data": config.get("val_data"),
        "val_split": config.get("val_split"), "train_pairs": summary.get("train_pairs"),
        "loss": config.get("loss"), "loss_settings": _loss_settings(config),
        "teachers": store_teachers(config), "epoch": epoch, "epochs": config.get("epochs"),
        "partial_epoch": bool(ckpt.get("partial_epoch")), "batch_size": config.get("batch_size"),
        "lr": config.get("lr"), "seed": config.get("seed"), "val": checkpoint_val_recalls(run, ckpt), "test": test,
        "checkpoint": checkpoint.name,
    }


def _loss_settings(config: dict) -> dict[str, Any]:
    terms = {}
    for term in ("contrastive", "csa", "usa"):
        settings = config.get(term)
        if isinstance(settings, dict) and settings.get("enabled", True):
            terms[term] = settings.get("rate")
    return terms


def store_teachers(config: dict) -> dict[str, Any]:
    """The teacher identities recorded in the run's stores ({"image": ..., "text": ...}); a store that did not
    travel with the run is named as such."""
    from teacher_cache.errors import StoreError
    from teacher_cache.store import Store

    out: dict[str, Any] = {}
    teachers: dict[str, dict | None] = {}  # of each store, opened once (one store serves both roles by default)
    for role, key in (("image", "image_cache"), ("text", "text_cache")):
        path = config.get(key) or config.get("cache")
        if not path:
            continue
        if path not in teachers:
            try:
                teachers[path] = Store.open(path).teachers
            except (StoreError, OSError, ValueError):
                teachers[path] = None
        found = teachers[path]
        out[role] = found.get(role) if found is not None else {"unknown": f"store {path} not found where the run "
                                                                          "recorded it"}
    return out


def checkpoint_val_recalls(run: Path, ckpt: dict) -> dict | None:
    """The validation recalls of a checkpoint's epoch: the checkpoint's own record when it is the best epoch, else
    that epoch's record in the run's metrics.jsonl."""
    epoch = int(ckpt.get("epoch", 0))
    best = ckpt.get("best") or {}
    if best.get("epoch") == epoch and best.get("metrics"):
        return dict(best["metrics"])
    for record in read_records(run / "metrics.jsonl"):
        if record.get("kind") == "epoch" and record.get("epoch") == epoch and isinstance(record.get("val"), dict):
            return dict(record["val"])
    return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _teacher_text(identity: Any) -> str:
    if not isinstance(identity, dict):
        return "none"
    if "unknown" in identity:
        return identity["unknown"]
    name = identity.get("spec") or identity.get("name") or identity.get("model")
    rest = ", ".join(f"{k}: {v}" for k, v in identity.items() if k not in ("spec", "name", "model")
                     and isinstance(v, (str, int, float)) and len(str(v)) < 80)
    return f"`{name}`" + (f" ({rest})" if rest else "") if name else json.dumps(identity)


def _recall_table(metrics: dict) -> str:
    head = "| " + " | ".join(k.replace("_", " ") for k in _RECALL_KEYS) + " |"
    rule = "|" + "---|" * len(_RECALL_KEYS)
    row = "| " + " | ".join(f"{float(metrics[k]):.1f}" if k in metrics else "–" for k in _RECALL_KEYS) + " |"
    return "\n".join([head, rule, row])


def render_model_card(card: dict[str, Any], name: str) -> str:
    """The README.md of an export: Hugging Face front matter, then what was trained on what, how, and how well."""
    stock = card["cross_head"] == "none"
    lines = ["---", "tags:", "- clip", "- cusa", "- image-text-retrieval", "library_name: open_clip",
             "pipeline_tag: zero-shot-image-classification", "---", f"# {name}", ""]
    init = f"`{card['pretrained']}` weights" if card["pretrained"] else "random initialisation"
    lines.append(f"An open_clip `{card['arch']}` model fine-tuned from {init} with cusa (CUSA: cross-modal and "
                 "uni-modal soft-label alignment, Huang et al., AAAI 2024) for image-text retrieval.")
    lines.append("")
    lines.append("## Loading")
    lines.append("")
    if stock:
        lines += ["Trained with `cross_head=none`: its retrieval embeddings are CLIP's own projected embeddings, so "
                  "stock open_clip loading gives the trained model exactly:", "", "```python", "import open_clip",
                  "", "model, _, preprocess = open_clip.create_model_and_transforms('local-dir:PATH_TO_THIS_FOLDER')",
                  "tokenizer = open_clip.get_tokenizer('local-dir:PATH_TO_THIS_FOLDER')", "```", "",
                  f"`{HEADS_FILE}` holds the uni-modal heads (image-image and text-text embeddings, trained by USA); "
                  "cusa's `load_model(PATH)` reads them too."]
    else:
        lines += ["**Stock open_clip loading yields the towers without the heads.** This model was trained with "
                  "CUSA's reference cross heads (LayerNorm → Linear on CLIP's projected embeddings), which no open_clip "
                  f"architecture holds; they are in `{HEADS_FILE}`. "
                  "`open_clip.create_model_and_transforms('local-dir:PATH')` builds CLIP's towers only, whose "
                  "embeddings are not the ones this model was trained to retrieve with. Load the whole model with "
                  "cusa:", "", "```python", "from train.model import load_model", "",
                  "model = load_model('PATH_TO_THIS_FOLDER')",
                  "img = model.encode_images(['a.jpg'])   # retrieval embeddings, heads applied",
                  "txt = model.encode_texts(['a dog on a beach'])", "```"]
    lines += ["", "## Training", ""]
    data = f"`{card['data']}` [{card['split']}]"
    if card["train_pairs"] is not None:
        data += f", {card['train_pairs']} image-caption pairs"
    lines.append(f"- **Training data:** {data}")
    if card["val_data"]:
        lines.append(f"- **Validation data:** `{card['val_data']}` [{card['val_split']}]")
    terms = ", ".join(f"{term} (rate {rate})" for term, rate in card["loss_settings"].items())
    lines.append(f"- **Loss:** {card['loss']}: {terms}" if terms else f"- **Loss:** {card['loss']}")
    for role in ("image", "text"):
        if role in card["teachers"]:
            lines.append(f"- **{role.capitalize()} teacher:** {_teacher_text(card['teachers'][role])}")
    partial = " (a mid-epoch checkpoint)" if card["partial_epoch"] else ""
    lines.append(f"- **Epochs:** {card['epoch']} of {card['epochs']} ({card['checkpoint']}{partial})")
    lines.append(f"- **Batch size, lr, seed:** {card['batch_size']}, {card['lr']}, {card['seed']}")
    lines.append(f"- **Retrieval embedding:** {card['embed_dim']}-d, "
                 + ("CLIP's projected embedding (`cross_head=none`)" if stock
                    else "CUSA's cross head on CLIP's projected embedding (`cross_head=reference`)"))
    lines += ["", "## Results", "", "Recall@K in percent (i2t: image to text, t2i: text to image), as `cusa-eval` "
              "measures it.", ""]
    if card["val"]:
        lines += [f"Validation, epoch {card['epoch']}:", "", _recall_table(card["val"]), ""]
    else:
        lines += ["Validation: none recorded for this checkpoint.", ""]
    if card["test"]:
        t = card["test"]
        lines += [f"Test, `{t.get('data')}` [{t.get('split')}], {t.get('images')} images, {t.get('captions')} "
                  "captions:", "", _recall_table(t), ""]
    else:
        lines += ["Test: not measured at export (`cusa-export ... --test-data DATA` adds it).", ""]
    return "\n".join(lines) + "\n"
