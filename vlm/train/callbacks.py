"""What a user sees at each validation: generation metrics over the whole val set, samples, collapse guards.

Under DDP each process generates for its own share of the val set; (dataset index, text) pairs are
gathered from all processes and de-duplicated by index (the distributed sampler pads the last shares with
repeats), so CIDEr-D, whose weights depend on the whole corpus, is computed on exactly the val set, and
equals a one-process run's. With a feature cache, generation starts from the cached trunk maps. Under
FSDP, generation runs with every shard gathered (``full_parameters``), entered by all processes together.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import timm.data
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch import Tensor

from vlm.config import DecodingConfig, MapConfig
from vlm.eval.caption import caption_scores, diversity, tokenize_caption
from vlm.eval.vqa import vqa_scores
from vlm.grounding.methods import token_maps
from vlm.grounding.overlay import token_grid
from vlm.model.generate import generate
from vlm.train.sharding import full_parameters

log = logging.getLogger(__name__)
MAX_PANELS = 12  # token overlays drawn per sample image


def gather_results(local: dict[Any, str]) -> dict[Any, str]:
    """Union of every process's {key: text}; a key generated twice (sampler padding) is kept once."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(local)
    parts: list[dict[Any, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict[Any, str] = {}
    for part in parts:
        merged.update(part or {})
    return dict(sorted(merged.items()))


def collapse_guards(captions: list[str]) -> dict[str, float]:
    """Share of identical captions, distinct-1/2, mean length and the number of distinct words used."""
    words = {w for c in captions for w in tokenize_caption(c).split()}
    return {**diversity(captions), "vocabulary": float(len(words))}


class GenerationMetrics(Callback):
    """Greedy captions and answers for every val item; corpus metrics, samples and collapse warnings.

    Works with any module that has ``model`` (a VisionLanguageModel) and ``tokenizer``, and any val
    dataset with ``references(index)`` (captions, and questions with answers and kind); batches carry
    ``index``.
    """

    def __init__(self, samples: int = 4, collapse_share: float = 0.5, decoding: DecodingConfig | None = None,
                 maps: MapConfig | None = None):
        self.samples, self.collapse_share = samples, collapse_share
        self.decoding = decoding or DecodingConfig()
        """How captions and answers are generated (default greedy; an answer's token budget is its own)."""
        self.maps = maps or MapConfig()
        """How the sample images' token maps are made: as `vlm attend` makes them with the same MapConfig."""
        self.metrics: dict[str, float] = {}
        """The last validation's metrics (the same on every process)."""
        self._captions: dict[int, str] = {}
        self._answers: dict[tuple[int, int], str] = {}
        self._images: dict[int, Tensor] = {}

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._captions, self._answers, self._images = {}, {}, {}

    @torch.no_grad()
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking:
            return
        dataset = _val_dataset(trainer, dataloader_idx)
        model, tok = pl_module.model, pl_module.tokenizer
        features = batch.features  # feature cache: batch.images holds the trunk's maps
        indices = batch.index.tolist()
        with full_parameters(model):
            self._generate(model, tok, dataset, batch.images, indices, features)
        if not features:  # cached maps cannot be drawn as sample images
            self._images.update({index: batch.images[row].detach().float().cpu()
                                 for row, index in enumerate(indices) if index < self.samples})

    def _generate(self, model: Any, tok: Any, dataset: Any, images: Tensor, indices: list[int],
                  features: bool) -> None:
        """Captions of the images and answers to each of their questions."""
        image_kv, _ = model.encode_features(images) if features else model.encode(images)
        kw = dict(eos_id=tok.eos_id, pad_id=tok.pad_id)
        captions = generate(model, image_kv, [tok.caption_prompt()] * len(indices), config=self.decoding, **kw)
        rows, prompts, keys = [], [], []
        for row, index in enumerate(indices):
            self._captions[index] = tok.decode(captions.tokens[row])
            for q, question in enumerate(dataset.references(index)["questions"]):
                rows.append(row)
                prompts.append(_question_prompt(tok, question["question"], model.cfg.decoder.max_length))
                keys.append((index, q))
        if rows:
            index = torch.tensor(rows, device=images.device)
            answer_kv = [(k[index], v[index]) for k, v in image_kv]  # each question reads its image's keys/values
            answering = replace(self.decoding, max_new_tokens=self.decoding.token_budget(answer=True))
            answers = generate(model, answer_kv, prompts, config=answering, **kw)
            self._answers.update({key: tok.decode(t) for key, t in zip(keys, answers.tokens, strict=True)})

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        captions, answers = gather_results(self._captions), gather_results(self._answers)
        if not captions:
            return
        dataset = _val_dataset(trainer, 0)
        refs = {index: dataset.references(index) for index in captions}
        scored = {i: c for i, c in captions.items() if refs[i]["captions"]}  # VQA-only images have no references
        metrics = {}
        if scored:
            metrics = {f"caption/{k}": v for k, v in caption_scores(scored, {i: refs[i]["captions"]
                                                                           for i in scored}).items()}
        if answers:
            truth = {(i, q): refs[i]["questions"][q] for i, q in answers}
            vqa = vqa_scores(answers, {k: t["answers"] for k, t in truth.items()},
                             {k: t["kind"] or "unknown" for k, t in truth.items()})  # as `vlm eval` names them
            metrics |= {f"vqa/{k}": v for k, v in vqa.items()}
        metrics |= {f"collapse/{k}": v for k, v in collapse_guards(list(captions.values())).items()}
        self.metrics = metrics
        # Every process holds the same gathered metrics: no reduction needed.
        pl_module.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=False, rank_zero_only=False)
        if metrics["collapse/identical_share"] >= self.collapse_share and trainer.is_global_zero:
            log.warning("step %d: captions are collapsing: %.0f%% of val images get the same caption",
                        trainer.global_step, 100 * metrics["collapse/identical_share"])
        if self.samples:
            # trainer.log_dir is a collective under DDP (rank 0's, broadcast): every process asks, rank 0 writes.
            folder = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
            with full_parameters(pl_module.model):  # every process gathers; rank 0 draws
                if trainer.is_global_zero and self._images:
                    self._log_samples(trainer, pl_module, captions, folder)

    @torch.no_grad()
    def _log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule, captions: dict[int, str],
                     folder: Path) -> None:
        """Each sample image with its generated caption and per-token attention overlays (to TensorBoard, or
        PNG files in ``folder``)."""
        model, tok = pl_module.model, pl_module.tokenizer
        indices = sorted(self._images)
        images = torch.stack([self._images[i] for i in indices]).to(pl_module.device)
        step = trainer.global_step
        for index, pixels, (ids, maps) in zip(indices, images, self.sample_maps(model, tok, images), strict=True):
            text = tok.decode(ids)
            shown = slice(0, MAX_PANELS)  # a rambling caption would make a huge, slow figure
            grid = token_grid(_to_pil(pixels, model.encoder.trunk), tok.tokens(ids)[shown], maps[shown], title=text)
            if isinstance(trainer.logger, TensorBoardLogger):
                trainer.logger.experiment.add_image(f"samples/{index}", np.asarray(grid), step, dataformats="HWC")
                trainer.logger.experiment.add_text(f"samples/{index}", text, step)
            else:  # CSV or no logger: PNG files and a captions file beside the metrics
                folder.mkdir(parents=True, exist_ok=True)
                grid.save(folder / f"step{step:06d}_item{index}.png")
                with open(folder / "captions.tsv", "a", encoding="utf-8") as f:
                    f.write(f"{step}\t{index}\t{text}\n")


    def sample_maps(self, model: Any, tok: Any, images: Tensor) -> list[tuple[list[int], np.ndarray]]:
        """Each image's generated caption (token ids) and its tokens' maps (T, h, w), made by the one map function
        with this callback's MapConfig, exactly as `Captioner.attend` makes them."""
        image_kv, grid = model.encode(images)
        prompt = tok.caption_prompt()
        gen = generate(model, image_kv, [prompt] * len(images), eos_id=tok.eos_id, pad_id=tok.pad_id,
                       config=self.decoding)
        maps = token_maps(model, image_kv, grid, [prompt] * len(images), gen.tokens, self.maps)
        return [(ids, m.cpu().numpy()) for ids, m in zip(gen.tokens, maps, strict=True)]


def _val_dataset(trainer: L.Trainer, dataloader_idx: int) -> Any:
    loaders = trainer.val_dataloaders
    loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
    return loader.dataset


def _question_prompt(tok: Any, question: str, max_length: int) -> list[int]:
    """The question prompt, cut to half the decoder's length so the answer has room."""
    return tok.cut_prompt(tok.question_prompt(question.strip()), max_length // 2)


def _to_pil(pixels: Tensor, trunk: torch.nn.Module) -> Image.Image:
    """Undo the encoder's normalisation: (3, H, W) -> an RGB image."""
    cfg = timm.data.resolve_data_config({}, model=trunk)
    mean = torch.tensor(cfg["mean"], device=pixels.device)[:, None, None]
    std = torch.tensor(cfg["std"], device=pixels.device)[:, None, None]
    rgb = ((pixels * std + mean).clamp(0, 1) * 255).round().byte()  # (3, H, W)
    return Image.fromarray(rgb.permute(1, 2, 0).cpu().numpy(), mode="RGB")
