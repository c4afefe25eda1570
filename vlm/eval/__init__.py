"""Evaluation: COCO caption metrics (the pycocoevalcap scorers fed by our Java-free PTB tokenization; METEOR and
SPICE where Java is found), caption diversity, the official VQA accuracy, grounding scores of attention maps against
boxes (pointing game, mass in box, box IoU, deletion curves), and whole evaluations on the built-in scenes or on a
dataset on disk."""

from vlm.eval.builtin import evaluate_builtin
from vlm.eval.caption import caption_evaluation, caption_scores, diversity, java_metrics, tokenize_caption
from vlm.eval.dataset import predict, read_results, score, write_outputs
from vlm.eval.grounding import GroundingCase, deletion_curves, grounding_scores, phrase_maps, pointing_by_choice
from vlm.eval.ptb import ptb_tokenize, ptb_tokenize_lines
from vlm.eval.run import evaluate_data
from vlm.eval.vqa import normalize_answer, vqa_accuracy, vqa_scores

__all__ = [
    "GroundingCase",
    "caption_evaluation",
    "caption_scores",
    "deletion_curves",
    "diversity",
    "evaluate_builtin",
    "evaluate_data",
    "grounding_scores",
    "java_metrics",
    "normalize_answer",
    "phrase_maps",
    "pointing_by_choice",
    "predict",
    "ptb_tokenize",
    "ptb_tokenize_lines",
    "read_results",
    "score",
    "tokenize_caption",
    "vqa_accuracy",
    "vqa_scores",
    "write_outputs",
]
