"""ClawMachine: the frozen visual tokenizer and a causal LM over the joint vocabulary.

The image enters the LM as ``[IMG] code ids [/IMG]``: the ids are ordinary rows of the LM's
embedding table (``code_offset + code``), so a region can be read (its ids in a question) and written
(its ids generated as an answer) like text. ``tokenize(pixel_values)`` runs the tokenizer
(:class:`groundlab.clawmachine.visual_tokenizer.DynamicVisualTokenizer`); the processor lays the ids
out (:mod:`groundlab.clawmachine.processing`). With ``config.hybrid`` the scene's span carries the kept
tokens' merged features through a 2-layer GELU projector instead of (or added to) its code embeddings
(regions stay discrete), and with ``config.scene_positions`` each scene code also carries its cell's row
and column embeddings; ``forward`` and ``generate`` then also take the scene's inputs and the
positions they fill (``ClawProcessor.scene_inputs``, gathered by ``ClawCollator``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM, LogitsProcessorList, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from groundlab.shared.attention import HF_ATTENTION
from groundlab.shared.devices import to_device
from groundlab.shared.multimodal import causal_lm_forward

from .configuration import ClawMachineConfig
from .processing import RegionConstraint
from .visual_tokenizer import DynamicVisualTokenizer, TokenizedImage


class ClawMachineForCausalLM(PreTrainedModel):
    config_class = ClawMachineConfig
    base_model_prefix = "clawmachine"
    main_input_name = "input_ids"
    _supports_attention_backend = True

    def __init__(self, config: ClawMachineConfig):
        super().__init__(config)
        self.visual_tokenizer = DynamicVisualTokenizer(config.tokenizer_config)
        self.visual_tokenizer.requires_grad_(False)
        text = config.text_config
        text._attn_implementation = HF_ATTENTION  # every attention layer through the shared dispatch
        self.language_model = LlamaForCausalLM(text)
        if config.hybrid:
            w, d = config.tokenizer_config.width, config.hidden_size
            self.mm_projector = nn.Sequential(nn.Linear(w, d), nn.GELU(), nn.Linear(d, d))
            if config.hybrid_mode == "add":  # starts as the discrete model: the features enter as they are learned
                nn.init.zeros_(self.mm_projector[2].weight)
                nn.init.zeros_(self.mm_projector[2].bias)
        if config.scene_positions:  # zero at the start: the model starts as the plain discrete one
            self.scene_rows = nn.Embedding(config.grid, config.hidden_size)
            self.scene_cols = nn.Embedding(config.grid, config.hidden_size)
            nn.init.zeros_(self.scene_rows.weight)
            nn.init.zeros_(self.scene_cols.weight)
        if config.tie_code_rows:
            self.language_model.lm_head.register_forward_hook(self._tied_code_logits)
        self.post_init()

    def _tied_code_logits(self, head: nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor:
        """``config.tie_code_rows``: the head's output with the codes' logits recomputed from the input
        embedding's code rows (a forward hook on the LM head; the state dict is unchanged)."""
        hidden, off, n = args[0], self.config.code_offset, self.config.codebook_size
        rows = self.language_model.get_input_embeddings().weight[off:off + n]
        codes = (hidden @ rows.t().to(hidden.dtype)).to(logits.dtype)
        return torch.cat([logits[..., :off], codes, logits[..., off + n:]], dim=-1)

    def _init_weights(self, module):  # the parts initialise themselves (and load pretrained weights)
        pass

    @torch.no_grad()
    def tokenize(self, pixel_values: torch.Tensor) -> list[TokenizedImage]:
        """(B, 3, H, W) images -> one :class:`TokenizedImage` each (deterministic unless the config says not)."""
        return self.visual_tokenizer.tokenize(pixel_values.to(self.device),
                                              sample=not self.config.tokenizer_config.deterministic)

    def embed(self, input_ids: torch.Tensor, scene_features: torch.Tensor | None = None,
              scene_mask: torch.Tensor | None = None, scene_cells: torch.Tensor | None = None) -> torch.Tensor:
        """The LM's input embeddings. ``scene_mask`` (B, T) marks the scene's codes, in order. There, in
        the hybrid layout, ``scene_features`` (n, width), projected, take the place of (``hybrid_mode``
        ``replace``) or are added to (``add``) the code embeddings; with ``scene_positions`` each code
        also gets the row and column embeddings of its cell, ``scene_cells`` (n,) raster indices."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        needs = {"scene_features": ("hybrid", self.config.hybrid, scene_features),
                 "scene_cells": ("scene_positions", self.config.scene_positions, scene_cells)}
        for name, (flag, needed, value) in needs.items():
            if value is not None and not needed:
                raise ValueError(f"{name} given to a model built without {flag}=True")
        if scene_mask is None:
            if self.config.scene_inputs and bool((input_ids == self.config.image_start_token_id).any()):
                raise ValueError("this model's scene needs scene_mask and its "
                                 f"{' and '.join(n for n, (_, needed, _) in needs.items() if needed)} "
                                 "(ClawProcessor.scene_inputs gives them)")
            return embeds
        n = int(scene_mask.sum())
        if n == 0:  # text only
            return embeds
        for name, (_, needed, value) in needs.items():
            if needed and (value is None or len(value) != n):
                raise ValueError(f"scene_mask marks {n} positions for {0 if value is None else len(value)} {name}")
        embeds = embeds.clone()
        scene = embeds[scene_mask]
        if self.config.hybrid:
            projected = self.mm_projector(scene_features.to(embeds.dtype))
            scene = projected + scene if self.config.hybrid_mode == "add" else projected
        if self.config.scene_positions:
            cells = scene_cells.to(embeds.device).long()
            scene = scene + self.scene_rows(cells // self.config.grid) + self.scene_cols(cells % self.config.grid)
        embeds[scene_mask] = scene.to(embeds.dtype)
        return embeds

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, scene_features: torch.Tensor | None = None,
                scene_mask: torch.Tensor | None = None, scene_cells: torch.Tensor | None = None,
                packed: bool = False, **kwargs) -> CausalLMOutputWithPast:
        """The causal LM loss over ``labels``. ``packed``: the LM runs on the batch's real tokens laid
        end to end in one padding-free row (same loss and gradients)."""
        embeds = self.embed(input_ids, scene_features, scene_mask, scene_cells)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if labels is None or self.config.first_code_weight == 1.0:
            return causal_lm_forward(self.language_model, embeds, attention_mask, labels, packed, **kwargs)
        items = kwargs.pop("num_items_in_batch", None)
        out = causal_lm_forward(self.language_model, embeds, attention_mask, None, packed, **kwargs)
        return CausalLMOutputWithPast(loss=self.weighted_loss(out.logits, input_ids, labels, items), logits=out.logits)

    def first_codes(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the answer positions that hold a region's first code (a code target right after
        ``[IMG]``; the scene's ``[IMG]`` opens no target)."""
        first = torch.zeros_like(labels, dtype=torch.bool)
        first[:, 1:] = (input_ids[:, :-1] == self.config.image_start_token_id) & self.config.is_code(labels[:, 1:])
        return first

    def weighted_loss(self, logits: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                      num_items: torch.Tensor | int | None = None) -> torch.Tensor:
        """The causal-LM loss with ``config.first_code_weight`` on each region's first code: the sum of
        the weighted token losses over the number of target tokens (``num_items``, the Trainer's count
        across accumulated batches, when given), so a weight of 1 gives the plain loss."""
        weights = torch.where(self.first_codes(input_ids, labels), self.config.first_code_weight, 1.0)[:, 1:]
        targets = labels[:, 1:]
        losses = nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                             ignore_index=-100, reduction="none").view_as(targets)
        weights = weights.to(losses.device) * (targets != -100)
        count = (targets != -100).sum() if num_items is None else num_items
        return (losses * weights).sum() / count

    def allowed_codes(self, images: list[TokenizedImage | None]) -> torch.Tensor:
        """(B, codebook) bool: the codes each sample's image holds (none for a text-only sample)."""
        allowed = torch.zeros(len(images), self.config.codebook_size, dtype=torch.bool, device=self.device)
        for b, image in enumerate(images):
            if image is not None:
                allowed[b, image.codes.to(self.device)] = True
        return allowed

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: list[TokenizedImage | None],
                 max_new_tokens: int = 64, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 constrained: bool = True, scene_features: torch.Tensor | None = None,
                 scene_mask: torch.Tensor | None = None, scene_cells: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy answers (B, new tokens) for a left-padded batch of prompts. ``constrained``: inside
        ``[IMG] ... [/IMG]`` only the codes of the sample's own image (see ``RegionConstraint``). The
        scene's inputs as :meth:`embed` takes them (what :class:`ClawCollator` gives)."""
        # the inputs may be made on the CPU while the model sits on a GPU
        input_ids, attention_mask, scene_features, scene_mask, scene_cells = to_device(
            (input_ids, attention_mask, scene_features, scene_mask, scene_cells), self.device)
        common = dict(attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
                      eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        # with inputs_embeds, HF hands the processors the new tokens only
        embeds = self.embed(input_ids, scene_features, scene_mask, scene_cells)  # checks what the scene needs
        prompt_length = 0 if scene_mask is not None else input_ids.shape[1]
        processors = LogitsProcessorList()
        if constrained:
            processors.append(RegionConstraint(self.config, self.allowed_codes(images), prompt_length))
        if scene_mask is not None:
            return self.language_model.generate(inputs_embeds=embeds, logits_processor=processors, **common)
        out = self.language_model.generate(input_ids=input_ids, logits_processor=processors, **common)
        return out[:, input_ids.shape[1]:]


# ----------------------------------------------------------------------------------------------
# what each stage trains


STAGES = ("stage1", "stage2")


def set_trainable(model: ClawMachineForCausalLM, stage: str) -> list[str]:
    """Both stages fine-tune the whole LM (the paper: full fine-tuning), embeddings and head included,
    the hybrid projector and the scene position embeddings; the visual tokenizer stays frozen. Returns
    the trainable names."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    model.requires_grad_(False)
    model.language_model.requires_grad_(True)
    if model.config.hybrid:
        model.mm_projector.requires_grad_(True)
    if model.config.scene_positions:
        model.scene_rows.requires_grad_(True)
        model.scene_cols.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]
