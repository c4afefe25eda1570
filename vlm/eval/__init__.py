"""Evaluation metrics: COCO caption scores (BLEU, CIDEr-D), caption diversity, the official VQA accuracy."""

from vlm.eval.caption import caption_scores, diversity, tokenize_caption
from vlm.eval.vqa import normalize_answer, vqa_accuracy, vqa_scores

__all__ = [
    "caption_scores",
    "diversity",
    "normalize_answer",
    "tokenize_caption",
    "vqa_accuracy",
    "vqa_scores",
]
