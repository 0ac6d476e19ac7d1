"""``cusa-export``: a trained open_clip student as the folder open_clip's ``save_for_hf`` writes, with a model card.

OUT holds ``open_clip_config.json`` (``model_cfg``: the student's architecture exactly as open_clip built it;
``preprocess_cfg``: its image preprocessing), ``open_clip_model.safetensors`` (and ``open_clip_pytorch_model.bin``
unless safetensors only) with CLIP's towers, the tokenizer's files (a Hugging Face tokenizer's, which open_clip reads
from a ``local-dir:`` folder; for the CLIP BPE tokenizer, which ships with open_clip, its Hugging Face form, as
``push_to_hf_hub`` uploads it), ``cusa_heads.safetensors``
(the heads open_clip has no place for, and the run's configuration) and ``README.md``, the model card.

A run trained with ``--set cross_head=none`` retrieves with CLIP's own projected embeddings, so stock open_clip
loading (``create_model_and_transforms("local-dir:OUT")``) reproduces it; a run with the reference heads puts a
LayerNorm → Linear head on each of them, which only ``load_model(OUT)`` applies (the card says so). Frozen-backbone
and region students are refused: their adapters, heads or pair scoring have no open_clip architecture.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import one_line
from train.checkpoint import load_checkpoint
from train.exported import (HEAD_PREFIXES, HEADS_FILE, HEADS_FORMAT, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS,
                            OPEN_CLIP_WEIGHTS_BIN)
from train.students import REGION_KINDS, parse_student_spec

EXPORT_FORMATS: tuple[str, ...] = ("open_clip",)
CHECKPOINT_NAMES = {"best": "best.pt", "last": "last.pt"}
MODEL_CARD = "README.md"
_RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


@dataclass
class ExportSource:
    """What an export reads: the run folder, the checkpoint chosen in it and that checkpoint's contents."""

    run: Path
    checkpoint: Path
    ckpt: dict


def resolve_export_checkpoint(run: str | os.PathLike, checkpoint: str = "best") -> tuple[Path, Path]:
    """(run folder, checkpoint file): ``best`` and ``last`` name RUN/best.pt and RUN/last.pt, anything else a file.
    RUN may itself be a checkpoint file. A checkpoint file's folder is the run folder the model card reads."""
    run = Path(run)
    if run.is_file():
        return run.parent, run
    if not run.is_dir():
        raise ValueError(f"{run}: no such run folder")
    if checkpoint in CHECKPOINT_NAMES:
        path = run / CHECKPOINT_NAMES[checkpoint]
        if not path.is_file():
            other = "last" if checkpoint == "best" else "best"
            hint = (f"; --checkpoint {other} exports {run / CHECKPOINT_NAMES[other]}"
                    if (run / CHECKPOINT_NAMES[other]).is_file() else " (has the run finished an epoch?)")
            raise ValueError(f"{run}: no {CHECKPOINT_NAMES[checkpoint]}{hint}")
        return run, path
    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"--checkpoint {checkpoint}: expected best, last or a checkpoint file; no such file")
    return path.parent, path


def check_exportable(source: ExportSource) -> dict:
    """The run's saved configuration; ValueError in one line for a student open_clip cannot express."""
    config = source.ckpt.get("config")
    if "student" not in source.ckpt or not isinstance(config, dict):
        raise ValueError(f"{source.checkpoint}: not a cusa-train checkpoint")
    student = str(config.get("student", ""))
    kind = parse_student_spec(student).kind
    if kind == "open_clip":
        return config
    if kind in REGION_KINDS:
        why = "a region student scores image-caption pairs and has no image or text embedding of its own"
    else:
        why = ("a frozen-backbone student's adapters and heads (LayerNorm → MLP, then LayerNorm → Linear) have no "
               "place in open_clip's timm and Hugging Face towers, whose projections are a bare Linear or MLP")
    raise ValueError(f"{source.checkpoint}: cannot export {student} as an open_clip model: {why}; cusa-export "
                     f"writes open_clip students (open_clip:ARCH[:CHECKPOINT]), and load_model({str(source.run)!r}) "
                     "serves this one")


def export_run(run: str | os.PathLike, out: str | os.PathLike, checkpoint: str = "best", fmt: str = "open_clip",
               safetensors_only: bool = False, overwrite: bool = False, test: dict | None = None) -> dict[str, Any]:
    """Write the open_clip folder of ``run``'s checkpoint into ``out`` (atomically: a half-written export never
    stands at OUT). ``test``: recalls measured on test data, for the model card. Returns the export's summary."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--format {fmt}: unknown export format (known: {', '.join(EXPORT_FORMATS)})")
    run_dir, checkpoint_path = resolve_export_checkpoint(run, checkpoint)
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out}: already exists; choose another folder or pass --overwrite")
    source = ExportSource(run_dir, checkpoint_path, load_checkpoint(checkpoint_path))
    config = check_exportable(source)

    from train.evaluation_run import load_trained_student

    student, cfg, ckpt = load_trained_student(checkpoint_path, "cpu")
    model_cfg = open_clip_model_config(student.arch, checkpoint_path)
    tmp = out.parent / f".{out.name}.export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = _write_open_clip_files(student, model_cfg, tmp, safetensors_only)
        files.append(_write_heads(student, config, int(ckpt.get("epoch", 0)), tmp))
        card = model_card_facts(source, config, student, test)
        (tmp / MODEL_CARD).write_text(render_model_card(card, out.name), encoding="utf-8")
        files.append(MODEL_CARD)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "format": fmt, "files": sorted(files), "checkpoint": str(checkpoint_path),
            "epoch": card["epoch"], "student": config["student"], "cross_head": cfg.cross_head,
            "open_clip_loads_retrieval_model": cfg.cross_head == "none",
            "load": (f"open_clip.create_model_and_transforms('local-dir:{out}')" if cfg.cross_head == "none"
                     else f"train.model.load_model('{out}')"),
            "val": card["val"], "test": card["test"]}


def open_clip_model_config(arch: str, where: Path) -> dict:
    """The ``model_cfg`` open_clip built the student from: a built-in architecture's config, or the one a
    ``local-dir:`` / ``hf-hub:`` folder holds (read as open_clip reads it)."""
    import open_clip

    try:
        model_cfg = open_clip.get_model_config(arch if ":" in arch else arch.replace("/", "-"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: cannot read the open_clip config of {arch} ({one_line(exc)})") from None
    if not model_cfg:
        raise ValueError(f"{where}: open_clip knows no architecture {arch!r}")
    return json.loads(json.dumps(model_cfg))  # a plain copy: open_clip may alter the dicts it hands out


def _write_open_clip_files(student, model_cfg: dict, out: Path, safetensors_only: bool) -> list[str]:
    """What open_clip's save_for_hf writes: the towers' weights, the tokenizer's files and open_clip_config.json."""
    from safetensors.torch import save_file

    # plain, unshared CPU tensors: safetensors refuses tensors that share memory
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in student.model.state_dict().items()}
    save_file(tensors, str(out / OPEN_CLIP_WEIGHTS), metadata={"format": "pt"})
    files = [OPEN_CLIP_WEIGHTS]
    if not safetensors_only:
        torch.save(tensors, out / OPEN_CLIP_WEIGHTS_BIN)
        files.append(OPEN_CLIP_WEIGHTS_BIN)
    before = set(os.listdir(out))
    save_tokenizer = getattr(student.tokenizer, "save_pretrained", None)
    if save_tokenizer is not None:  # an HF tokenizer: local-dir loading reads its files from the folder
        save_tokenizer(str(out))
    else:
        write_clip_bpe_tokenizer(out, int(model_cfg.get("text_cfg", {}).get("context_length", 77)))
    files += sorted(set(os.listdir(out)) - before)
    preprocess = {k: list(v) if isinstance(v, tuple) else v
                  for k, v in dict(student.model.visual.preprocess_cfg).items()}
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess},
                                                   indent=2) + "\n", encoding="utf-8")
    files.append(OPEN_CLIP_CONFIG)
    return files


def write_clip_bpe_tokenizer(out: Path, context_length: int) -> None:
    """The CLIP BPE tokenizer as Hugging Face tools read it (what open_clip's ``push_to_hf_hub`` uploads for such a
    model, there fetched from openai/clip-vit-large-patch14), built offline from the vocabulary open_clip ships. open_clip
    itself tokenizes with its own copy; these files serve the hub and transformers."""
    import gzip
    import tempfile

    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    # the vocabulary exactly as open_clip's SimpleTokenizer builds it, its two special tokens under OpenAI's names
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                                  model_max_length=context_length)
        tokenizer.save_pretrained(str(out))


def _write_heads(student, config: dict, epoch: int, out: Path) -> str:
    from safetensors.torch import save_file

    heads = {k: v.detach().cpu().contiguous().clone() for k, v in student.state_dict().items()
             if k.startswith(HEAD_PREFIXES)}
    save_file(heads, str(out / HEADS_FILE),
              metadata={"format": HEADS_FORMAT, "cross_head": str(config.get("cross_head", "reference")),
                        "epoch": str(epoch), "trained_student": str(config["student"]),
                        "config": json.dumps(config)})
    return HEADS_FILE


# ---------------------------------------------------------------------------------------------- model card
def model_card_facts(source: ExportSource, config: dict, student, test: dict | None) -> dict[str, Any]:
    """What the model card states, gathered from the run folder, its checkpoint and its teacher store."""
    ckpt = source.ckpt
    epoch = int(ckpt.get("epoch", 0))
    summary = _read_json(source.run / "summary.json") or {}
    return {
        "student": config["student"], "arch": student.arch, "pretrained": student.pretrained,
        "cross_head": config.get("cross_head", "reference"), "embed_dim": student.embed_dim,
        "data": config.get("data"), "split": config.get("split"), "val_data": config.get("val_data"),
        "val_split": config.get("val_split"), "train_pairs": summary.get("train_pairs"),
        "loss": config.get("loss"), "loss_settings": _loss_settings(config),
        "teachers": store_teachers(config), "epoch": epoch, "epochs": config.get("epochs"),
        "partial_epoch": bool(ckpt.get("partial_epoch")), "batch_size": config.get("batch_size"),
        "lr": config.get("lr"), "seed": config.get("seed"), "val": checkpoint_val_recalls(source), "test": test,
        "checkpoint": source.checkpoint.name,
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
    for role, key in (("image", "image_cache"), ("text", "text_cache")):
        path = config.get(key) or config.get("cache")
        if not path:
            continue
        try:
            out[role] = Store.open(path).teachers.get(role)
        except (StoreError, OSError, ValueError):
            out[role] = {"unknown": f"store {path} not found where the run recorded it"}
    return out


def checkpoint_val_recalls(source: ExportSource) -> dict | None:
    """The validation recalls of the exported checkpoint's epoch: the checkpoint's own record when it is the best
    epoch, else that epoch's record in metrics.jsonl."""
    ckpt = source.ckpt
    epoch = int(ckpt.get("epoch", 0))
    best = ckpt.get("best") or {}
    if best.get("epoch") == epoch and best.get("metrics"):
        return dict(best["metrics"])
    log = source.run / "metrics.jsonl"
    if not log.is_file():
        return None
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
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


# ---------------------------------------------------------------------------------------------- hub
def check_hub_online() -> None:
    """ValueError (one line) when the Hugging Face hub is switched off in this process."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise ValueError("--push-to-hub needs the Hugging Face hub, which is switched off (HF_HUB_OFFLINE=1, cusa's "
                         "default); run the export with HF_HUB_OFFLINE=0")


def push_folder(out: str | os.PathLike, repo_id: str, private: bool = False, revision: str | None = None,
                commit_message: str = "Add model") -> dict[str, str]:
    """Upload an export folder as open_clip's ``push_to_hf_hub`` does: create the repo if needed, then upload the
    folder in one commit. The folder stays as it is whatever happens."""
    check_hub_online()
    from huggingface_hub import create_repo, upload_folder

    try:
        repo_url = create_repo(repo_id, private=private, exist_ok=True)
        full_id = repo_url.repo_id  # the owner may have been implicit
        commit = upload_folder(repo_id=full_id, folder_path=str(out), revision=revision,
                               commit_message=commit_message)
    except Exception as exc:  # the hub's errors are many (HTTP, network, auth); each is one line here
        raise ValueError(f"push of {out} to {repo_id} failed ({one_line(exc)}); the export is complete, push it "
                         f"again with --push-to-hub or `hf upload {repo_id} {out}`") from None
    return {"repo_id": full_id, "url": str(getattr(commit, "commit_url", repo_url))}
