"""PV2TEA (paper §3, Figure 3): visual encoder + text encoder → question fusion → answer decoder.

``forward(batch, sample_weights)`` returns the named loss terms; ``generate(batch)`` returns
answer token ids. Which schemes exist is decided by :class:`SchemesConfig` at construction:
parts of a disabled scheme are not built, so every built parameter is trained.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertLMHeadModel, BertModel, GenerationConfig

from pv2tea.config import Config
from pv2tea.data.batch import Batch  # re-exported: its home was this module
from pv2tea.losses.contrastive import label_smoothed_contrastive
from pv2tea.losses.generation import (
    category_loss,
    distill_class_targets,
    per_sample_class_kl,
    per_sample_token_ce,
    per_sample_token_kl,
    soft_target_ce,
    weighted_generation_loss,
)
from pv2tea.losses.matching import image_text_matching_loss, negative_partners
from pv2tea.models.copy_decoder import CopyDecoder, copy_mask
from pv2tea.models.fusion import FusionEncoder, additive_mask, is_visual_gate_key
from pv2tea.models.momentum import FeatureQueue, ema_update, freeze_copy, gather_others, world_size
from pv2tea.models.sharing import shared
from pv2tea.models.text import create_text_encoder, read_text_state_dict, transfer
from pv2tea.models.vision import VisualEncoder, VisualOutput, load_backbone_weights, timm_api


@dataclass
class Encoded:
    """What :meth:`PV2TEA.encode` computes once per batch and the heads read: the grounded question and its context."""

    question: torch.Tensor  # (B, Q, H) grounded representation q
    question_mask: torch.Tensor  # (B, Q)
    text_hidden: torch.Tensor  # (B, T, H)
    text_mask: torch.Tensor  # (B, T): the text tokens fusion and copying may read (zeros where text is dropped)
    visual: VisualOutput | None  # over the rows with an image only
    image_rows: torch.Tensor  # (B,) bool
    context: torch.Tensor  # (B, K(1 + P) + T, H): [visual; text] tokens the question cross-attends
    context_mask: torch.Tensor  # (B, K(1 + P) + T)
    memory: torch.Tensor  # (B, M, H) what the decoder cross-attends: q, or [q; visual; text]
    memory_mask: torch.Tensor  # (B, M)


@dataclass
class PV2TEAOutput:
    """What :meth:`PV2TEA.forward` returns: the training loss, its named terms and the features to enqueue."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]  # loss_gen, loss_sc, loss_ct (those enabled)
    per_sample_gen: torch.Tensor  # (B,) unweighted g(y_n, ŷ_n)
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)  # features to enqueue


_PRETRAINED = re.compile(
    r"^(text_encoder\.|visual\.backbone\.|fusion\.embeddings\.|"
    r"fusion\.layers\.\d+\.(attention|intermediate|output)\.|decoder\.bert\.embeddings\.|"
    r"decoder\.bert\.encoder\.layer\.\d+\.(attention|intermediate|output)\.)"
)


class PV2TEA(nn.Module):
    """PV2TEA (paper §3, Figure 3): an image encoder and a text encoder, a question fused with both, an answer head.

    The parts a configuration switches off are not built (``visual`` is None for a text-only model, the momentum
    copies exist with S1's contrastive alignment only), so every built parameter trains. Training calls
    :meth:`forward` with a batch that has answers and gets the named loss terms; inference calls :meth:`generate`
    (open answers), :meth:`score_candidates` (closed lists) or :meth:`classify` (the classification head). Most
    programs do not build one by hand: :func:`pv2tea.models.build.build_for_training` and
    :func:`pv2tea.models.build.load_from_checkpoint` (a saved folder) return it with its
    :class:`~pv2tea.data.dataset.Preprocessor`, which makes its batches, and
    :class:`~pv2tea.inference.predictor.Predictor` wraps both.
    """

    # the parts a text-only (TEA) run trains that every variant shares: what ``train.warm_start`` warm-starts
    warm_start_prefixes: tuple[str, ...] = ("text_encoder.", "fusion.", "decoder.")
    # parts a configuration may leave out (None); the momentum copies exist with S1's contrastive alignment only
    visual: VisualEncoder | None
    decoder: BertLMHeadModel | None
    value_head: nn.Linear | None
    value_attribute: torch.Tensor  # (V,) attribute index of each value class (classification head only)
    category_head: nn.Linear | None
    itm_head: nn.Linear | None
    text_encoder: BertModel
    visual_m: VisualEncoder | None
    text_encoder_m: BertModel
    vision_proj: nn.Linear
    text_proj: nn.Linear
    vision_proj_m: nn.Linear
    text_proj_m: nn.Linear

    def __init__(
        self, cfg: Config, bert_config: BertConfig, num_categories: int, value_attributes: list[int] | None = None
    ):
        """Build the parts the configuration asks for, randomly initialized (:meth:`load_pretrained` loads weights).

        Args:
            cfg: The run's configuration; the model reads ``vision``, ``text``, ``fusion``, ``decoder`` and
                ``schemes``.
            bert_config: The text checkpoint's configuration (hidden size, vocabulary, layers).
            num_categories: The number of product categories (the size of S2's category head).
            value_attributes: ``value_attributes[v]`` is the attribute index of value class v (classification
                head only).

        Raises:
            ValueError: ``text.num_layers`` or ``text.train_layers`` exceeds the checkpoint's layers, or the
                classification head is asked for without ``value_attributes``.
        """
        super().__init__()
        self.cfg = cfg
        s = cfg.schemes
        hidden = bert_config.hidden_size
        self.bert_config = bert_config
        self.visual = (
            VisualEncoder(cfg.vision, hidden, attention_pruning=s.attention_pruning) if cfg.vision.enabled else None
        )
        text_layers = cfg.text.num_layers or bert_config.num_hidden_layers
        if not 1 <= text_layers <= bert_config.num_hidden_layers:
            raise ValueError(
                f"text.num_layers={cfg.text.num_layers}: the text checkpoint has {bert_config.num_hidden_layers} layers"
            )
        self.text_encoder = create_text_encoder(
            BertConfig(**{**bert_config.to_dict(), "num_hidden_layers": text_layers})
        )
        if cfg.text.train_layers is not None and cfg.text.train_layers > text_layers:
            raise ValueError(f"text.train_layers={cfg.text.train_layers}: the text encoder has {text_layers} layers")
        # the bottom layers that never train (all with text.freeze); with a feature cache their output is cached
        self.text_frozen_layers = (
            text_layers if cfg.text.freeze else text_layers - cfg.text.train_layers if cfg.text.train_layers else 0
        )
        self.text_cached = cfg.text.freeze or cfg.text.train_layers is not None  # the embeddings are frozen
        fusion_layers = cfg.fusion.num_layers or bert_config.num_hidden_layers
        # the gated visual path exists only where there are images (a TEA's fusion is the text-only one)
        self.fusion = FusionEncoder(
            bert_config, fusion_layers, cfg.fusion.visual_gate if self.visual is not None else None
        )
        if cfg.decoder.head == "generate":
            dec_config = BertConfig(
                **{
                    **bert_config.to_dict(),
                    "is_decoder": True,
                    "add_cross_attention": True,
                    "num_hidden_layers": cfg.decoder.num_layers or bert_config.num_hidden_layers,
                    "tie_word_embeddings": True,
                }
            )
            self.decoder = (CopyDecoder if cfg.decoder.copy else BertLMHeadModel)(dec_config)
            self.value_head = None
        else:
            if not value_attributes:
                raise ValueError("the classification head needs the value vocabulary (value_attributes)")
            self.decoder = None
            self.value_head = nn.Linear(hidden, len(value_attributes))
            self.register_buffer("value_attribute", torch.tensor(value_attributes, dtype=torch.long))
        self.category_head = nn.Linear(hidden, num_categories) if s.category_loss else None
        self.uses_contrast = s.contrastive and s.alignment == "contrastive"
        # binary image-text matching on the fused question's [CLS] (the Figure 4 baseline)
        self.itm_head = nn.Linear(hidden, 2) if s.contrastive and s.alignment == "matching" else None
        if self.uses_contrast:
            self.vision_proj = nn.Linear(hidden, s.embed_dim)
            self.text_proj = nn.Linear(hidden, s.embed_dim)
            self.visual_m = copy.deepcopy(self.visual)
            self.text_encoder_m = copy.deepcopy(self.text_encoder)
            self.vision_proj_m = copy.deepcopy(self.vision_proj)
            self.text_proj_m = copy.deepcopy(self.text_proj)
            for m in self._momentum_pairs():
                freeze_copy(m[1])
            self.queue = FeatureQueue(s.embed_dim, s.queue_size)
        if cfg.vision.freeze and self.visual is not None:
            self.visual.backbone.requires_grad_(False)
        # what a feature cache can hold of the image side: all of a frozen backbone, or its frozen lower part
        self.visual_cached = self.visual is not None and (cfg.vision.freeze or self.visual.cut is not None)
        if self.text_cached:
            # the frozen text side includes the pretrained vocabulary: the word embeddings of the question
            # (fusion) and of the answer decoder, whose output layer they are tied to (big and slow to update)
            for module in self._frozen_text_parts(self.text_encoder):
                module.requires_grad_(False)
            self.fusion.embeddings.word_embeddings.requires_grad_(False)
            if self.decoder is not None:
                self.decoder.get_input_embeddings().requires_grad_(False)

    # ----------------------------------------------------------------- construction helpers
    def _frozen_text_parts(self, encoder: BertModel) -> list[nn.Module]:
        """The embeddings and bottom layers of a text encoder that stay frozen (none when it all trains)."""
        if not self.text_cached:
            return []
        return [encoder.embeddings, *encoder.encoder.layer[: self.text_frozen_layers]]

    def _momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        if not self.uses_contrast:
            return []
        visual = [(self.visual, self.visual_m)] if self.visual is not None and self.visual_m is not None else []
        return [
            *visual,
            (self.text_encoder, self.text_encoder_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_proj, self.text_proj_m),
        ]

    def _require_visual(self) -> VisualEncoder:
        if self.visual is None:
            raise ValueError("this model has no visual encoder (vision.enabled is false)")
        return self.visual

    def _require_decoder(self) -> BertLMHeadModel:
        if self.decoder is None:
            raise ValueError("this model has no answer decoder (decoder.head is not 'generate')")
        return self.decoder

    def load_pretrained(self) -> None:
        """Initialize backbones, fusion and decoder from the configured offline checkpoints."""
        from pv2tea.models.text import resolve_text_path

        if self.visual is not None:
            load_backbone_weights(self.visual.backbone, self.cfg.vision.weights, self.cfg.vision.name)
        text_path = resolve_text_path(self.cfg.text.path)
        source = read_text_state_dict(text_path)
        n_src = self.bert_config.num_hidden_layers
        transfer(self.text_encoder, source, {k: k for k in self.text_encoder.state_dict()}, (), str(text_path))
        fusion_src = list(range(len(self.fusion.layers)))
        if max(fusion_src) >= n_src:
            raise ValueError(f"fusion.num_layers={len(self.fusion.layers)} exceeds the {n_src} layers of {text_path}")
        transfer(
            self.fusion,
            source,
            self.fusion.pretrained_mapping(fusion_src, self.cfg.fusion.cross_from_self),
            ("layers.",),
            "fusion",
        )
        if self.decoder is not None:
            self._load_decoder(source, n_src, str(text_path))
        self.sync_momentum()

    def _load_decoder(self, source: dict[str, torch.Tensor], n_src: int, text_path: str) -> None:
        decoder = self._require_decoder()
        dec_layers = decoder.config.num_hidden_layers
        if dec_layers > n_src:
            raise ValueError(f"decoder.num_layers={dec_layers} exceeds the {n_src} layers of {text_path}")
        mapping = {}
        for k in decoder.state_dict():
            if k.startswith("bert.embeddings."):
                mapping[k] = k[len("bert.") :]
            elif k.startswith("bert.encoder.layer.") and ".crossattention." not in k:
                mapping[k] = k[len("bert.") :]
            elif k.startswith("bert.encoder.layer.") and self.cfg.fusion.cross_from_self:
                mapping[k] = k[len("bert.") :].replace(".crossattention.", ".attention.")
        mapping["cls.predictions.decoder.weight"] = "embeddings.word_embeddings.weight"  # tied
        transfer(decoder, source, mapping, ("cls.", "bert.encoder.layer.", "copy_"), "decoder")

    @torch.no_grad()
    def sync_momentum(self) -> None:
        """Copy the online encoders and projections into their momentum copies (S1; after loading weights)."""
        for online, momentum in self._momentum_pairs():
            momentum.load_state_dict(online.state_dict())

    def parameter_groups(
        self, warm_started: bool = False, warm_head: bool = False
    ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(pretrained, newly initialized) trainable parameters, for separate learning rates.

        ``warm_started``: the parts a warm start fills (``warm_start_prefixes``) count as pretrained; ``warm_head``:
        the classification head too (a warm start with one of its own, copied class by class).
        """
        pretrained: list[nn.Parameter] = []
        new: list[nn.Parameter] = []
        warm = self.warm_start_keys() if warm_started else set()
        if warm_started and warm_head and self.value_head is not None:
            warm |= {"value_head.weight", "value_head.bias"}
        for name, p in self.named_parameters():
            if p.requires_grad:
                trained = _PRETRAINED.match(name) or name in warm
                (pretrained if trained else new).append(p)
        return pretrained, new

    def warm_start_parameters(self, warm_head: bool = False) -> set[int]:
        """``id``s of the trainable parameters a warm start fills (``warm_start_keys``; ``warm_head``: and the
        classification head carried over from it)."""
        keys = self.warm_start_keys()
        if warm_head and self.value_head is not None:
            keys |= {"value_head.weight", "value_head.bias"}
        return {id(p) for name, p in self.named_parameters() if p.requires_grad and name in keys}

    def warm_start_keys(self) -> set[str]:
        """State-dict keys a warm start fills: the text encoder, fusion and decoder, minus the gated visual
        path of the fusion (``fusion.visual_gate``), which a text-only run does not have."""
        return {k for k in self.state_dict() if k.startswith(self.warm_start_prefixes) and not is_visual_gate_key(k)}

    def train(self, mode: bool = True) -> PV2TEA:
        """Set training mode, keeping the frozen parts (frozen backbones and text layers, ``vision.freeze_bn``'s
        batch norms) in eval mode, so that their outputs are the ones a feature cache stores.

        Args:
            mode: True for training mode, False for eval mode (everything).

        Returns:
            The model itself.
        """
        super().train(mode)
        if not mode:
            return self
        if self.cfg.vision.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        # frozen encoders stay deterministic (no dropout), so cached states equal live ones
        if self.visual_cached:
            for visual in (self.visual, getattr(self, "visual_m", None)):
                if visual is not None:
                    for module in visual.frozen_modules():
                        module.eval()
        for encoder in (self.text_encoder, getattr(self, "text_encoder_m", None)):
            if encoder is not None:
                for module in [encoder] if self.cfg.text.freeze else self._frozen_text_parts(encoder):
                    module.eval()
        return self

    # --------------------------------------------------------------------------- forward
    def encode(self, batch: Batch) -> Encoded:
        """Encode the images and text of a batch and fuse the question with them (everything before the head).

        Args:
            batch: The rows, from pixels or from cached backbone and text states.

        Returns:
            The grounded question, its context and what the answer head cross-attends.
        """
        text_hidden = self._text_states(self.text_encoder, batch)  # (B, T, H)
        rows = batch.has_image if self.visual is not None else torch.zeros_like(batch.has_image)
        visual = None
        parts, masks = [], []
        if self.visual is not None and bool(rows.any()):
            visual = self._visual_out(self.visual, batch.images, batch.image_feats, rows)
            vis_tokens, vis_mask = self._scatter_tokens(visual.tokens, rows[:, None], text_hidden)
            parts.append(vis_tokens)
            masks.append(vis_mask)
            if batch.extra_mask is not None and bool(batch.extra_mask.any()):
                extra = self._visual_out(
                    self.visual, batch.extra_images, batch.extra_feats, batch.extra_mask
                )  # (N_extra, 1 + P, H)
                ext_tokens, ext_mask = self._scatter_tokens(extra.tokens, batch.extra_mask, text_hidden)
                parts.append(ext_tokens)
                masks.append(ext_mask)
        text_mask = batch.text_mask
        keeps_image = rows
        if self.training and self.cfg.schemes.image_dropout > 0 and visual is not None:
            hide = rows & (torch.rand(len(batch), device=rows.device) < self.cfg.schemes.image_dropout)  # (B,)
            masks = [m & ~hide[:, None] for m in masks]  # the fusion sees none of those rows' visual tokens
            keeps_image = rows & ~hide
        if self.training and self.cfg.schemes.text_dropout > 0 and visual is not None:
            drop = keeps_image & (torch.rand(len(batch), device=rows.device) < self.cfg.schemes.text_dropout)  # (B,)
            text_mask = text_mask * (~drop)[:, None].to(text_mask.dtype)
        context = torch.cat([*parts, text_hidden], 1)  # (B, K(1 + P) + T, H)
        context_mask = torch.cat([*[m.to(text_mask.dtype) for m in masks], text_mask], 1)
        question = self.fusion(
            batch.question_ids,
            batch.question_mask,
            context,
            context_mask,
            n_visual=context.shape[1] - text_hidden.shape[1],
        )
        if self.cfg.decoder.attend_context:
            memory = torch.cat([question, context], 1)  # (B, Q + K(1 + P) + T, H)
            memory_mask = torch.cat([batch.question_mask, context_mask], 1)
        else:
            memory, memory_mask = question, batch.question_mask
        return Encoded(
            question,
            batch.question_mask,
            text_hidden,
            text_mask,
            visual,
            rows,
            context,
            context_mask,
            memory,
            memory_mask,
        )

    @property
    def shares_inputs(self) -> bool:
        """Whether rows with the same text (or image) are encoded once per batch (:mod:`pv2tea.models.sharing`):
        always in inference, where it is exact; in training with ``train.product_batches``, where the rows of a
        product then also share the encoders' dropout draw."""
        return not self.training or self.cfg.train.product_batches

    def _text_states(self, encoder: BertModel, batch: Batch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Text-encoder states (B, T, H) of all rows or the selected ``rows``. With the batch's cached output of
        the frozen bottom layers only the trainable top layers (``text.train_layers``; none when frozen) run."""
        select = slice(None) if rows is None else rows
        ids, text_mask = batch.text_ids[select], batch.text_mask[select]  # (B', T)
        cached = None if batch.text_hidden is None else batch.text_hidden[select]  # (B', T, H) after the frozen layers
        top = encoder.encoder.layer[self.text_frozen_layers :]

        def run(idx: torch.Tensor) -> torch.Tensor:
            if cached is None:
                return encoder(input_ids=ids[idx], attention_mask=text_mask[idx]).last_hidden_state
            hidden = cached[idx]
            if len(top):
                mask = additive_mask(text_mask[idx], hidden.dtype)  # (U, 1, 1, T)
                for layer in top:
                    hidden = layer(hidden, attention_mask=mask)
            return hidden

        return shared(run, (ids, text_mask), self.shares_inputs)

    @torch.no_grad()
    def frozen_text_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) output of the text encoder's frozen part: what a feature cache stores."""
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[self.text_frozen_layers]

    def _visual_out(
        self, encoder: VisualEncoder, pixels: torch.Tensor | None, feats: torch.Tensor | None, select: torch.Tensor
    ) -> VisualOutput:
        """The visual encoder on the selected images: cached backbone tokens when given, else pixels; each distinct
        image once when :attr:`shares_inputs`."""
        if feats is None and pixels is None:
            raise ValueError("the batch has neither images nor cached image features")
        chosen = (feats if feats is not None else pixels)[select]  # type: ignore[index]  # (N, ...)
        if feats is not None:
            return shared(lambda idx: encoder.head(encoder.from_cache(chosen[idx])), (chosen,), self.shares_inputs)
        return shared(lambda idx: encoder(chosen[idx]), (chosen,), self.shares_inputs)

    @staticmethod
    def _scatter_tokens(
        tokens: torch.Tensor, present: torch.Tensor, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of the present images (N, 1 + P, H) → per-row slots (B, K(1 + P), H) plus their mask."""
        b, k = present.shape
        n_tokens = tokens.shape[1]
        slots = like.new_zeros(b, k, n_tokens, like.shape[-1])  # (B, K, 1 + P, H)
        slots[present] = tokens.to(slots.dtype)  # under autocast the two may differ
        mask = present[:, :, None].expand(-1, -1, n_tokens)  # (B, K, 1 + P)
        return slots.flatten(1, 2), mask.flatten(1)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """Move the momentum copies towards the online parts by ``schemes.momentum`` (EMA, S1; after each step)."""
        for online, momentum in self._momentum_pairs():
            ema_update(online, momentum, self.cfg.schemes.momentum)

    def answer_logits(self, batch: Batch, enc: Encoded | None = None) -> torch.Tensor:
        """(B, A, V) next-token logits of the decoder over the batch's answers, teacher-forced."""
        if batch.answer_ids is None or batch.answer_mask is None:
            raise ValueError("answer_logits needs answer_ids (training labels)")
        enc = self.encode(batch) if enc is None else enc
        return self._require_decoder()(
            input_ids=batch.answer_ids,
            attention_mask=batch.answer_mask,
            encoder_hidden_states=enc.memory,
            encoder_attention_mask=enc.memory_mask,
            **self._copy_inputs(enc, batch),
        ).logits  # (B, A, V)

    def forward(
        self, batch: Batch, sample_weights: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None
    ) -> PV2TEAOutput:
        """The training loss of a batch and its named terms (``loss_gen``, ``loss_sc``, ``loss_ct``: those enabled).

        Args:
            batch: The rows with their answers (``answer_ids``; :meth:`Preprocessor.collate
                <pv2tea.data.dataset.Preprocessor.collate>` with answers).
            sample_weights: (B,) weights of the rows' generation loss (S3); None: all 1.
            teacher_logits: A frozen teacher's view of the same batch, distilled with weight ``loss.distill_weight``:
                with the decoder its :meth:`answer_logits` (B, A, V), with the classification head its
                log-probabilities over this model's value classes (B, V; :mod:`pv2tea.train.distill`).

        Returns:
            The weighted sum of the terms, the terms, the unweighted per-row generation loss and the momentum
            features to enqueue.

        Raises:
            ValueError: The batch has no answers.
        """
        if batch.answer_ids is None or batch.answer_mask is None:
            raise ValueError("forward needs answer_ids (training labels); use generate() for inference")
        cfg, s = self.cfg, self.cfg.schemes
        enc = self.encode(batch)
        distill: torch.Tensor | None = None
        if self.decoder is not None:
            logits = self.answer_logits(batch, enc)  # (B, A, V)
            labels = batch.answer_ids.masked_fill(batch.answer_mask == 0, -100)
            per_sample = per_sample_token_ce(logits, labels, cfg.loss.label_smoothing)
            if teacher_logits is not None and cfg.loss.distill_weight > 0:
                distill = per_sample_token_kl(logits, teacher_logits, labels)  # (B,)
                a = cfg.loss.distill_weight
                per_sample = (1 - a) * per_sample + a * distill
        else:
            if batch.value_targets is None:
                raise ValueError("the classification head trains on value_targets; the batch has none")
            log_probs = F.log_softmax(self._value_logits(enc, batch), dim=-1)  # (B, V)
            targets = batch.value_targets / batch.value_targets.sum(1, keepdim=True).clamp_min(1)
            if teacher_logits is not None and cfg.loss.distill_weight > 0:  # the teacher's log-probs, (B, V)
                targets, _ = distill_class_targets(targets, teacher_logits, cfg.loss.distill_weight)
                distill = per_sample_class_kl(log_probs, teacher_logits)  # (B,)
            per_sample = soft_target_ce(log_probs, targets)  # (B,)
        terms = {"loss_gen": weighted_generation_loss(per_sample, sample_weights)}
        if distill is not None:  # its share of loss_gen, logged
            terms["loss_kd"] = distill.detach().mean()
        total = cfg.loss.weight_gen * terms["loss_gen"]
        momentum: dict[str, torch.Tensor] = {}
        rows = enc.image_rows
        if self.category_head is not None and enc.visual is not None:
            known = batch.category[rows] >= 0
            cat_logits = self.category_head(enc.visual.pooled[known])  # (B_img, C)
            terms["loss_ct"] = category_loss(cat_logits, batch.category[rows][known])
            total = total + cfg.loss.weight_ct * terms["loss_ct"]
        if self.itm_head is not None and enc.visual is not None:
            itm = self._matching_loss(enc, batch)
            if itm is not None:
                terms["loss_itm"] = itm
                total = total + cfg.loss.weight_sc * itm
        if self.uses_contrast and enc.visual is not None:
            image_feat = F.normalize(self.vision_proj(enc.visual.pooled), dim=-1)  # (B_img, D)
            text_feat = F.normalize(self.text_proj(enc.text_hidden[rows, 0]), dim=-1)  # (B_img, D)
            assert self.visual_m is not None  # copied from the visual encoder that produced enc.visual
            with torch.no_grad():
                # a frozen backbone equals its momentum copy, so cached states serve both
                vis_m = self._visual_out(self.visual_m, batch.images, batch.image_feats, rows)
                image_feat_m = F.normalize(self.vision_proj_m(vis_m.pooled), dim=-1)
                text_m = self._text_states(self.text_encoder_m, batch, rows)  # (B_img, T, H)
                text_feat_m = F.normalize(self.text_proj_m(text_m[:, 0]), dim=-1)
            valid = self.queue.valid()
            bank = [self.queue.image[valid], self.queue.text[valid], self.queue.ids[valid]]
            momentum = {"image": image_feat_m, "text": text_feat_m, "ids": batch.pair_id[rows]}
            if world_size() > 1:  # the other ranks' rows of this step are in-batch rows too (momentum.py)
                bank = [
                    torch.cat([*_others(momentum[k].to(q.dtype)), q]) for k, q in zip(("image", "text", "ids"), bank)
                ]
            queue_image, queue_text, queue_ids = bank
            sc = label_smoothed_contrastive(
                image_feat,
                text_feat,
                image_feat_m,
                text_feat_m,
                batch.pair_id[rows],
                queue_image,
                queue_text,
                queue_ids,
                alpha=s.alpha,
                temperature=s.temperature,
            )
            terms["loss_sc"] = sc["loss_sc"]
            total = total + cfg.loss.weight_sc * terms["loss_sc"]
        elif self.uses_contrast and world_size() > 1:  # no image row here: still take part in the other ranks' gather
            empty = self.queue.image.new_zeros((0, self.queue.image.shape[1]))
            momentum = {"image": empty, "text": empty, "ids": self.queue.ids.new_zeros((0,))}
            for key in ("image", "text", "ids"):
                gather_others(momentum[key])
        return PV2TEAOutput(loss=total, terms=terms, per_sample_gen=per_sample.detach(), momentum=momentum)

    def _matching_loss(self, enc: Encoded, batch: Batch) -> torch.Tensor | None:
        """ITM over the image rows: each text with its own image (match) and with another product's (no match)."""
        head = self._require_itm_head()
        sel = torch.nonzero(enc.image_rows).flatten()  # (B_img,)
        partner = negative_partners(batch.pair_id[sel])
        if partner is None:
            return None
        n_vis = enc.context.shape[1] - enc.text_hidden.shape[1]
        neg = sel[partner]
        context = torch.cat([enc.context[neg, :n_vis], enc.text_hidden[sel]], 1)  # (B_img, K(1 + P) + T, H)
        mask = torch.cat([enc.context_mask[neg, :n_vis], batch.text_mask[sel]], 1)
        q_neg = self.fusion(batch.question_ids[sel], batch.question_mask[sel], context, mask, n_visual=n_vis)[
            :, 0
        ]  # (B_img, H)
        return image_text_matching_loss(head(enc.question[sel, 0]), head(q_neg))

    @torch.no_grad()
    def match_scores(self, batch: Batch) -> torch.Tensor:
        """P(match) of every (image of row i, text of row j) pair (N, N), by the ITM head on the fusion.

        Uses each row's first image and row j's question; for retrieval with a matching-aligned model.
        """
        head = self._require_itm_head()
        enc = self.encode(batch)
        n_vis = enc.context.shape[1] - enc.text_hidden.shape[1]
        n = len(batch)
        scores = torch.zeros(n, n)
        for j in range(n):  # one text against every image
            context = torch.cat([enc.context[:, :n_vis], enc.text_hidden[j].expand(n, -1, -1)], 1)
            mask = torch.cat([enc.context_mask[:, :n_vis], batch.text_mask[j].expand(n, -1)], 1)
            q = self.fusion(
                batch.question_ids[j].expand(n, -1), batch.question_mask[j].expand(n, -1), context, mask, n_visual=n_vis
            )
            scores[:, j] = head(q[:, 0]).softmax(-1)[:, 1]
        return scores

    def _require_itm_head(self) -> nn.Linear:
        if self.itm_head is None:
            raise ValueError("this model has no matching head (schemes.alignment is not 'matching')")
        return self.itm_head

    @torch.no_grad()
    def enqueue(self, out: PV2TEAOutput) -> None:
        """Push a step's momentum features into S1's queues of negatives (a no-op without contrastive alignment)."""
        if out.momentum:
            self.queue.enqueue(out.momentum["image"], out.momentum["text"], out.momentum["ids"])

    # ------------------------------------------------------------------------- inference
    @torch.no_grad()
    def generate(
        self,
        batch: Batch,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
    ) -> torch.Tensor:
        """Answer token ids (B, L) starting with ``bos_id``; greedy (with a key/value cache) or beam search.

        Args:
            batch: The rows to answer (no answers needed).
            bos_id: The token that starts an answer ([CLS]).
            eos_id: The token that ends one ([SEP]).
            pad_id: The padding token.
            num_beams: The beam width; None: ``decoder.num_beams``; 1 is greedy.
            max_new_tokens: The longest answer; None: ``decoder.max_answer_tokens``.

        Returns:
            (B, L) token ids; the preprocessor's tokenizer turns them into values.
        """
        from pv2tea.models.greedy import greedy_decode

        enc = self.encode(batch)
        if (num_beams or self.cfg.decoder.num_beams) == 1 and self.decoder is not None:
            steps = max_new_tokens or self.cfg.decoder.max_answer_tokens
            copy = self._copy_inputs(enc, batch)
            if copy and isinstance(self.decoder, CopyDecoder):  # the copy keys of the text are the same at every step
                copy["copy_keys"] = self.decoder.copy_key(copy["copy_states"])  # (B, T, H)
            return greedy_decode(self.decoder, enc.memory, enc.memory_mask, bos_id, eos_id, pad_id, steps, **copy)
        start = torch.full((len(batch), 1), bos_id, dtype=torch.long, device=batch.text_ids.device)
        gen_cfg = GenerationConfig(
            max_new_tokens=max_new_tokens or self.cfg.decoder.max_answer_tokens,
            num_beams=num_beams or self.cfg.decoder.num_beams,
            do_sample=False,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            # transformers 5's BERT cross-attention cache is not usable by generate; answers are short
            use_cache=False,
        )
        return self._require_decoder().generate(
            input_ids=start,
            attention_mask=torch.ones_like(start),
            encoder_hidden_states=enc.memory,
            encoder_attention_mask=enc.memory_mask,
            generation_config=gen_cfg,
            **self._copy_inputs(enc, batch),
        )

    def _copy_inputs(self, enc: Encoded, batch: Batch, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The text tokens the copy decoder may copy (of all rows or the selected ``rows``); {} without copy."""
        if not self.cfg.decoder.copy:
            return {}
        select = slice(None) if rows is None else rows
        return {
            "copy_states": enc.text_hidden[select],
            "copy_ids": batch.text_ids[select],
            "copy_mask": copy_mask(enc.text_mask[select]),
        }

    def _value_logits(self, enc: Encoded, batch: Batch) -> torch.Tensor:
        """Classification head on q_cls; classes of other attributes are masked out. (B, V)"""
        if self.value_head is None:
            raise ValueError("this model has no classification head (decoder.head is not 'classify')")
        if batch.attribute_id is None:
            raise ValueError("the classification head needs the batch's attribute_id")
        logits = self.value_head(enc.question[:, 0])  # (B, V)
        own = self.value_attribute[None, :] == batch.attribute_id[:, None]  # (B, V)
        return logits.masked_fill(~own, torch.finfo(logits.dtype).min)

    def value_logits(self, batch: Batch) -> torch.Tensor:
        """(B, V) classification logits of the batch; the classes of other attributes than a row's are masked."""
        return self._value_logits(self.encode(batch), batch)

    @torch.no_grad()
    def classify(
        self, batch: Batch, allowed: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> list[list[int]]:
        """Value-class indices per row: argmax, or for multi-value rows every class with at least half
        the top probability. ``allowed`` (B, V) bool restricts the classes (candidate lists); ``bias`` (B, V)
        is added to the log-probabilities (an extractor's weighted log-prior, late fusion)."""
        logits = self._value_logits(self.encode(batch), batch)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
        if bias is not None:
            logits = logits.log_softmax(-1) + bias
        probs = logits.softmax(-1)  # (B, V)
        top = probs.max(-1, keepdim=True).values
        multi = batch.multi_value if batch.multi_value is not None else torch.zeros(len(batch), dtype=torch.bool)
        out = []
        for i in range(len(batch)):
            if bool(multi[i]):
                out.append(torch.nonzero(probs[i] >= 0.5 * top[i]).flatten().tolist())
            else:
                out.append([int(probs[i].argmax())])
        return out

    @torch.no_grad()
    def score_candidates(
        self, batch: Batch, rows: torch.Tensor, cand_ids: torch.Tensor, cand_mask: torch.Tensor
    ) -> torch.Tensor:
        """Sequence log-likelihood log p(candidate | product, question) for each candidate (N,).

        rows (N,): the batch row each candidate belongs to; cand_ids/cand_mask (N, L) with [CLS] first.
        """
        decoder = self._require_decoder()
        enc = self.encode(batch)
        hidden = decoder.bert(
            cand_ids,
            attention_mask=cand_mask,
            encoder_hidden_states=enc.memory[rows],
            encoder_attention_mask=enc.memory_mask[rows],
            return_dict=True,
        ).last_hidden_state  # (N, L, H)
        # The output distribution is needed only after the real tokens of each candidate, and once per distinct
        # (row, prefix): the options of a row share their first position ([CLS]), often more. Its vocabulary
        # projection is most of the cost, so it runs on those states alone, never on a dense (N, L, V).
        n_cands, length = cand_ids.shape
        targets_at = cand_mask[:, 1:].bool()  # (N, L-1): position p predicts token p + 1
        cand, pos = targets_at.nonzero(as_tuple=True)  # (S,), (S,)
        if len(cand) == 0:
            return hidden.new_zeros(n_cands)
        upto = torch.arange(length, device=cand_ids.device)[None, :] <= pos[:, None]  # (S, L)
        prefix = torch.where(upto, cand_ids[cand], torch.full_like(cand_ids[cand], -1))  # (S, L)
        keys = torch.cat([rows[cand][:, None], prefix], 1)  # (S, 1 + L)
        distinct, state_of = torch.unique(keys, dim=0, return_inverse=True)  # (U, 1 + L), (S,)
        first = torch.full((len(distinct),), len(cand), device=cand.device).scatter_reduce(
            0, state_of, torch.arange(len(cand), device=cand.device), "amin"
        )  # (U,): one step holding each state
        states = hidden[cand[first], pos[first]][:, None]  # (U, 1, H)
        state_rows = rows[cand[first]]  # (U,)
        if isinstance(decoder, CopyDecoder):
            copy = self._copy_inputs(enc, batch, state_rows)
            logits = decoder.output_log_probs(states, **copy)[:, 0]  # (U, V), log-probabilities already
        else:
            logits = decoder.cls(states)[:, 0]  # (U, V)
        log_probs = F.log_softmax(logits, dim=-1)  # (U, V)
        token_lp = log_probs[state_of, cand_ids[cand, pos + 1]]  # (S,)
        return hidden.new_zeros(n_cands).index_add_(0, cand, token_lp.to(hidden.dtype))

    @torch.no_grad()
    def image_features(
        self, images: torch.Tensor | None = None, feats: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """Pooled visual features (for S3's KNN) and the S2 patch mask σ(M) (B, P) with its grid.

        From pixels (B, 3, H, W) or from cached features (:meth:`VisualEncoder.cached_tokens`).
        """
        visual = self._require_visual()
        out = visual.head(visual.from_cache(feats)) if feats is not None else visual(_pixels(images))
        mask = torch.sigmoid(out.mask_logits) if out.mask_logits is not None else None
        return out.pooled, mask, out.grid

    @torch.no_grad()
    def backbone_features(self, images: torch.Tensor | None = None, feats: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C) mean of the visual backbone's output tokens, from pixels or cached features."""
        return self._backbone_tokens(images, feats).mean(1)

    def _backbone_tokens(self, images: torch.Tensor | None, feats: torch.Tensor | None) -> torch.Tensor:
        """(B, N, C) backbone tokens from cached features (:meth:`VisualEncoder.cached_tokens`) or pixels."""
        visual = self._require_visual()
        return visual.from_cache(feats) if feats is not None else visual.backbone_tokens(_pixels(images))

    @torch.no_grad()
    def level_features(self, images: torch.Tensor | None = None, feats: torch.Tensor | None = None) -> torch.Tensor:
        """(B, ΣC_i) mean over the backbone tokens of the earlier levels' channels only (``vision.extra_levels``),
        from pixels or cached features."""
        visual = self._require_visual()
        tokens = self._backbone_tokens(images, feats)
        return tokens[..., timm_api(visual.backbone).num_features :].mean(1)

    @torch.no_grad()
    def masked_backbone_features(
        self, images: torch.Tensor | None = None, feats: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, C) mean of the backbone's patch tokens weighted by the S2 mask σ(M): the product, not its background.

        Without attention pruning it is :meth:`backbone_features`. From pixels or cached features.
        """
        visual = self._require_visual()
        tokens = self._backbone_tokens(images, feats)
        out = visual.head(tokens)
        gate = torch.sigmoid(out.mask_logits) if out.mask_logits is not None else None  # (B, P) or None
        if gate is None:
            return tokens.mean(1)
        patches = tokens[:, visual.num_prefix_tokens :]  # (B, P, C)
        return (patches * gate.unsqueeze(-1)).sum(1) / gate.sum(1, keepdim=True).clamp_min(1e-6)


def _pixels(images: torch.Tensor | None) -> torch.Tensor:
    if images is None:
        raise ValueError("pass images (B, 3, H, W) or cached backbone tokens (B, N, C)")
    return images


def _others(rows: torch.Tensor) -> list[torch.Tensor]:
    """The other processes' ``rows`` (:func:`gather_others`) as a list to concatenate (empty in one process)."""
    others = gather_others(rows)
    return [] if others is None else [others]
