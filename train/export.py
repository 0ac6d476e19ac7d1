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
from train.factory import CHECKPOINT_BEST, CHECKPOINT_LAST, student_from_checkpoint
from train.exported import (HEAD_PREFIXES, HEADS_FILE, HEADS_FORMAT, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS,
                            OPEN_CLIP_WEIGHTS_BIN)
from train.model_card import model_card_facts, render_model_card
from train.students import REGION_KINDS, parse_student_spec

EXPORT_FORMATS: tuple[str, ...] = ("open_clip",)
CHECKPOINT_NAMES = {"best": CHECKPOINT_BEST, "last": CHECKPOINT_LAST}
MODEL_CARD = "README.md"


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
    config = source.ckpt["config"]  # load_checkpoint refused a file without it
    if not isinstance(config, dict):
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
               safetensors_only: bool = False, overwrite: bool = False, test: dict | None = None,
               source: ExportSource | None = None) -> dict[str, Any]:
    """Write the open_clip folder of ``run``'s checkpoint into ``out`` (atomically: a half-written export never
    stands at OUT). ``test``: recalls measured on test data, for the model card; ``source``: the run's checkpoint
    already read (as ``cusa-export --test-data`` has it, to refuse before evaluating). Returns the export's summary."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--format {fmt}: unknown export format (known: {', '.join(EXPORT_FORMATS)})")
    run_dir, checkpoint_path = (source.run, source.checkpoint) if source else resolve_export_checkpoint(run, checkpoint)
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out}: already exists; choose another folder or pass --overwrite")
    source = source or ExportSource(run_dir, checkpoint_path, load_checkpoint(checkpoint_path))
    ckpt = source.ckpt
    config = check_exportable(source)
    student, cfg = student_from_checkpoint(ckpt, checkpoint_path, "cpu")
    model_cfg = open_clip_model_config(student.arch, checkpoint_path)
    tmp = out.parent / f".{out.name}.export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = _write_open_clip_files(student, model_cfg, tmp, safetensors_only)
        files.append(_write_heads(student, config, int(ckpt.get("epoch", 0)), tmp))
        card = model_card_facts(source.run, source.checkpoint, source.ckpt, config, student, test)
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
