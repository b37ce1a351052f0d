"""OMG-LLaVA (Zhang et al., NeurIPS 2024, arXiv 2406.19389): one frozen universal segmenter as visual
encoder and mask decoder, any causal LM in between.

Per image, the frozen segmenter gives (:meth:`OMGLlavaForCausalLM.perceive`):

- pixel-centric inputs: its stride-32 features, 2x pixel-unshuffled, concatenated with the perception
  prior (:mod:`groundlab.omg_llava.perception`) -> ``pixel_mlp`` -> one token per grid cell;
- a learned separator token;
- object-centric inputs: ``[Q ; E]`` of the valid queries -> ``query_proj`` -> ``object_mlp``.

The released projector has two MLPs (``model_feat`` for the pixel tokens, ``model`` after ``query_proj``
for the object tokens); so does this one. The tokens replace the prompt's ``<image>`` placeholder (the
dataset expands it to the image's token count). ``[SEG]``: the LLM's last hidden state at each ``[SEG]``
position -> ``text2vision`` (D -> 2d -> 2d) -> (query_feat, query_pos) -> the frozen decoder's head and
every layer on the image's cached pixel-decoder features -> ``layers + 1`` mask predictions, all
supervised (gradients flow through the frozen decoder into ``text2vision`` and the LLM).

Special tokens ``[SEG]``, ``<p>``, ``</p>``, ``<region>``, ``<mark>`` each get an embedding row of their own
(the tokenizer and the LLM's vocabulary are checked against each other at build time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from groundlab.shared.attention import HF_ATTENTION, require_packing_support
from groundlab.shared.devices import to_device
from groundlab.shared.multimodal import pack_rows, splice_features

from .configuration import OMGLlavaConfig
from .losses import mask_loss
from .omg_seg import OMGSegModel
from .perception import perception_prior, pixel_unshuffle
from .processing import IMAGE_TOKEN, PROMPT_KINDS, SPECIAL_TOKENS


def mlp(dim_in: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim), nn.GELU(), nn.Linear(dim, dim))


class VisualProjector(nn.Module):
    def __init__(self, clip_dim: int, query_dim: int, hidden: int):
        super().__init__()
        self.pixel_mlp = mlp(clip_dim + query_dim, hidden)
        self.query_proj = nn.Linear(query_dim, clip_dim)
        self.object_mlp = mlp(clip_dim, hidden)
        self.separator = nn.Embedding(1, hidden)

    def objects(self, qe: torch.Tensor) -> torch.Tensor:
        return self.object_mlp(self.query_proj(qe))

    def forward(self, pixels: torch.Tensor, prior: torch.Tensor, objects: torch.Tensor | None) -> torch.Tensor:
        parts = [self.pixel_mlp(torch.cat([pixels, prior], -1)), self.separator.weight]
        if objects is not None:
            parts.append(self.objects(objects))
        return torch.cat(parts, 0)


@dataclass
class Perception:
    """What the frozen segmenter gives for one image."""

    pixels: torch.Tensor  # (g*g, clip_dim)
    prior: torch.Tensor  # (g*g, 2d)
    objects: torch.Tensor  # (n_valid, 2d)
    mask_features: torch.Tensor  # (1, mask_dim, H/4, W/4)
    memory: list[torch.Tensor]
    pos: list[torch.Tensor]

    def num_tokens(self, use_object_tokens: bool = True) -> int:
        return self.pixels.shape[0] + 1 + (self.objects.shape[0] if use_object_tokens else 0)


@dataclass
class OMGLlavaOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    seg_loss: torch.Tensor | None = None
    seg_masks: list | None = None
    seg_mismatched: int | None = None


def stack_perception(perception: list[Perception]) -> dict:
    """Several images' cached segmenter features as one batch: ``{"mask_features", "memory", "pos"}``."""
    return {"mask_features": torch.cat([p.mask_features for p in perception]),
            "memory": [torch.cat(m) for m in zip(*(p.memory for p in perception))],
            "pos": [torch.cat(m) for m in zip(*(p.pos for p in perception))]}


def padding_self_mask(counts: list[int], device: torch.device | str | None = None) -> torch.Tensor | None:
    """(B, N, N) self-attention mask for queries padded to N = max(counts), True = a padding query no
    other may attend to; None when nothing is padded."""
    width = max(counts)
    if width == min(counts):
        return None
    pad = torch.arange(width, device=device)[None] >= torch.tensor(counts, device=device)[:, None]  # (B, N)
    return pad[:, None, :].expand(-1, width, -1)


def seg_self_mask(counts: list[int], attend: bool, device: torch.device | str | None = None) -> torch.Tensor | None:
    """The decoder's self-attention mask for the ``[SEG]`` queries of several answers, padded to the
    longest: with ``attend`` each sees its own answer's queries (:func:`padding_self_mask`); without,
    each sees only itself (the release's one query per batch element; padding then needs no mask)."""
    if attend:
        return padding_self_mask(counts, device)
    width = max(counts)
    return ~torch.eye(width, dtype=torch.bool, device=device)[None].expand(len(counts), -1, -1)


def mix_seed(*parts: int) -> int:
    """One generator seed from several integers (a sample's seed, a mask's index, a decoder layer)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**61 - 1)
    return seed


class OMGLlavaForCausalLM(PreTrainedModel):
    config_class = OMGLlavaConfig
    base_model_prefix = "omg_llava"

    def __init__(self, config: OMGLlavaConfig):
        super().__init__(config)
        self.segmenter = OMGSegModel(config.seg_config)
        self.segmenter.requires_grad_(False)
        self.llm = AutoModelForCausalLM.from_config(config.text_config)
        self.llm.set_attn_implementation(HF_ATTENTION)  # every attention layer through the shared dispatch
        d = config.text_config.hidden_size
        self.projector = VisualProjector(config.clip_dim, config.query_dim, d)
        self.text2vision = mlp(d, config.query_dim)
        self.post_init()

    def _init_weights(self, module):
        pass  # modules keep their constructors' initialisation; pretrained parts are loaded over them

    def check_tokenizer(self, tokenizer) -> None:
        """Every special token and ``<image>`` is one token of its own, with a row in the LLM's embeddings
        and the id recorded in the config."""
        vocab = self.llm.get_input_embeddings().weight.shape[0]
        for tok in (IMAGE_TOKEN, *SPECIAL_TOKENS):
            ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"{tok} is not a single token of the tokenizer ({ids}); add it as a special token")
            if ids[0] >= vocab:
                raise ValueError(f"{tok} has id {ids[0]} but the LLM has {vocab} embedding rows: resize them")
            if self.config.token_ids.get(tok) != ids[0]:
                raise ValueError(f"config.token_ids[{tok!r}] = {self.config.token_ids.get(tok)} but the tokenizer says {ids[0]}")

    # ------------------------------------------------------------------------------------------
    # the frozen segmenter

    @torch.no_grad()
    def perceive(self, pixel_values: torch.Tensor) -> list[Perception]:
        seg = self.segmenter
        enc = seg.encode(pixel_values.to(self.device, self.dtype))  # a bf16 model reads bf16 pixels
        last = seg.decode(enc)[-1]
        g = self.config.grid
        pixels = pixel_unshuffle(enc["features"][self.config.feature_level], self.config.shuffle)  # (B, g*g, clip_dim)
        out = []
        for b in range(pixel_values.shape[0]):
            prior, valid = perception_prior(last.class_logits[b], last.mask_logits[b], last.query[b],
                                            seg.decoder.query_embed.weight, (g, g))
            qe = torch.cat([last.query[b], seg.decoder.query_embed.weight], -1)[valid]
            out.append(Perception(pixels[b], prior, qe, enc["mask_features"][b : b + 1],
                                  [m[b : b + 1] for m in enc["memory"]], [p[b : b + 1] for p in enc["pos"]]))
        return out

    def visual_embeds(self, perception: list[Perception]) -> list[torch.Tensor]:
        """Each image's visual tokens: pixel tokens (with the prior, or zeros in its place when
        ``use_prior`` is off), the separator, then the object tokens (when ``use_object_tokens``). The
        ablations act here, not in :meth:`perceive`, so one perception serves every arm."""
        use_obj, use_prior = self.config.use_object_tokens, self.config.use_prior
        return [self.projector(p.pixels, p.prior if use_prior else torch.zeros_like(p.prior),
                               p.objects if use_obj else None) for p in perception]

    # ------------------------------------------------------------------------------------------

    def prompt_queries(self, p: Perception, kind: str, prompts: torch.Tensor) -> torch.Tensor:
        """One image's visual prompts through the frozen decoder: ``[query ; query_pos]`` (N, 2d) of each
        prompt query after the last layer. ``kind``: ``mask`` (``<region>``: (N, S, S) bool masks at the
        segmenter's input resolution) or ``point`` (``<mark>``: (N, 2) input-pixel (x, y))."""
        return self.batch_prompt_queries([p], kind, [prompts])[0]

    @torch.no_grad()
    def batch_prompt_queries(self, perception: list[Perception], kind: str, prompts: list[torch.Tensor]
                             ) -> list[torch.Tensor]:
        """:meth:`prompt_queries` of several images in one decoder call: each image's prompts padded
        (with copies of its first) to the longest, the padding kept out of self-attention, so every
        image's queries see only its own prompts, as when run alone."""
        counts = [len(x) for x in prompts]
        width = max(counts)
        padded = torch.stack([torch.cat([x, x[:1].expand(width - len(x), *x.shape[1:])]) for x in prompts])
        seg = self.segmenter
        enc = stack_perception(perception)
        feat, pos = seg.prompt_queries(kind, padded, mask_features=enc["mask_features"])
        last = seg.run_prompts(enc, kind, padded, queries=(feat, pos),
                               self_mask=padding_self_mask(counts, padded.device))[-1]
        out = torch.cat([last.query, pos], -1)
        return [out[i, :n] for i, n in enumerate(counts)]

    def embed(self, input_ids: torch.Tensor, perception: list[Perception], prompts: list[dict] | None = None
              ) -> torch.Tensor:
        """Token embeddings with the visual tokens spliced in at ``<image>`` and, per sample, the visual
        prompts (``prompts[b]``: ``{"<region>": (N, S, S) masks, "<mark>": (N, 2) points}``) at their
        placeholders through the object-centric projector, in order. Counts must match exactly."""
        image_id = self.config.token_ids[IMAGE_TOKEN]
        safe = input_ids.masked_fill(input_ids == image_id, 0)
        embeds = self.llm.get_input_embeddings()(safe)
        embeds = splice_features(embeds, input_ids, self.visual_embeds(perception), image_id).clone()
        for token, kind in PROMPT_KINDS.items():
            tid = self.config.token_ids[token]
            rows, given_prompts = [], []
            for b in range(input_ids.shape[0]):
                where = (input_ids[b] == tid).nonzero().flatten()
                given = (prompts[b] or {}).get(token) if prompts is not None else None
                n_given = 0 if given is None else len(given)
                if len(where) != n_given:
                    raise ValueError(f"sample {b}: {len(where)} {token} tokens but {n_given} {kind} prompts")
                if n_given:
                    rows.append((b, where))
                    given_prompts.append(given)
            if rows:  # every image's prompts of this kind in one decoder call
                queries = self.batch_prompt_queries([perception[b] for b, _ in rows], kind, given_prompts)
                feats = self.projector.objects(torch.cat(queries)).to(embeds.dtype)
                for (b, where), f in zip(rows, feats.split([len(q) for q in queries])):
                    embeds[b, where] = f
        return embeds

    def decode_seg(self, hidden: torch.Tensor, p: Perception):
        """(n, D) ``[SEG]`` hidden states of one image -> its decoder's ``layers + 1`` predictions."""
        q = self.text2vision(hidden)[None]  # (1, n, 2d)
        feat, pos = q.split(self.config.seg_config.dim, dim=-1)
        mask = seg_self_mask([q.shape[1]], self.config.seg_queries_attend, q.device)
        return self.segmenter.decoder.run_queries(feat, pos, p.mask_features, p.memory, p.pos, self_mask=mask)

    def decode_segs(self, hiddens: list[torch.Tensor], perception: list[Perception]) -> tuple[list[torch.Tensor], list[int]]:
        """The ``[SEG]`` hidden states of several images, (n_i, D) each, decoded in one batch: the
        queries of an image padded to the longest and kept out of the others' self-attention (and out
        of each other's unless ``config.seg_queries_attend``). Returns
        the ``layers + 1`` mask logits, each (images, max n_i, S/4, S/4), and the n_i."""
        counts = [h.shape[0] for h in hiddens]
        q = self.text2vision(torch.cat(hiddens))
        padded = q.new_zeros(len(counts), max(counts), q.shape[-1])
        for i, chunk in enumerate(q.split(counts)):
            padded[i, : counts[i]] = chunk
        feat, pos = padded.split(self.config.seg_config.dim, dim=-1)
        enc = stack_perception(perception)
        preds = self.segmenter.decoder.run_queries(feat, pos, enc["mask_features"], enc["memory"], enc["pos"],
                                                   self_mask=seg_self_mask(counts, self.config.seg_queries_attend,
                                                                           q.device))
        return [pr.mask_logits for pr in preds], counts

    def forward(self, input_ids, attention_mask=None, labels=None, perception: list[Perception] | None = None,
                pixel_values=None, seg_masks: list[torch.Tensor] | None = None, prompts: list[dict] | None = None,
                packed: bool = False, point_seeds: list[int] | None = None, num_items_in_batch=None,
                **unused) -> OMGLlavaOutput:
        """``perception`` (precomputed, the segmenter being frozen) or ``pixel_values``; ``prompts``: the
        visual prompts of each sample (see :meth:`embed`); ``seg_masks``: per
        sample the (n_seg, S, S) target masks of its ``[SEG]`` tokens, in reading order. A sample whose
        ``[SEG]`` count differs from its mask count is skipped for the mask loss and counted in
        ``seg_mismatched`` (never silently zeroed). ``packed``: the LLM runs on the batch's real tokens
        laid end to end in one padding-free row (the same function; no FLOP on padding).
        ``point_seeds`` (one per sample): the mask loss's random points drawn per sample and ``[SEG]``
        from these seeds, so they do not depend on the batch's make-up (or the process holding it).
        ``num_items_in_batch``: the CE is a sum over this many label tokens (the Trainer's count over
        the whole step), not a mean over this batch's."""
        if perception is None:
            if pixel_values is None:
                raise ValueError("OMG-LLaVA needs pixel_values or a precomputed perception")
            perception = self.perceive(pixel_values)
        # cached perceptions and prompts are made on the CPU; the Trainer moves tensors, not these
        perception, prompts, seg_masks = to_device((perception, prompts, seg_masks), self.device)
        embeds = self.embed(input_ids, perception, prompts)
        logits, hidden, ce_loss = self._run_llm(embeds, attention_mask, labels, packed, num_items_in_batch)
        loss, seg_loss, mismatched, masks_out = ce_loss, None, 0, []
        if seg_masks is not None:
            seg_id = self.config.token_ids["[SEG]"]
            queries, percs, targets, owners = [], [], [], []
            for b, (p, target) in enumerate(zip(perception, seg_masks)):
                where = (input_ids[b] == seg_id).nonzero().flatten()
                if len(where) != len(target):
                    mismatched += 1
                elif len(where):
                    queries.append(hidden[b, where])
                    percs.append(p)
                    targets.append(target.float())
                    owners.append(b)
            if queries:
                preds, counts = self.decode_segs(queries, percs)
                dev = hidden.device
                sample = torch.repeat_interleave(torch.arange(len(counts), device=dev), torch.tensor(counts, device=dev))
                tgt = torch.cat(targets)
                terms = []
                for layer, pred in enumerate(preds):  # every prediction (deep supervision): mean per sample
                    logits = torch.cat([pred[i, :n] for i, n in enumerate(counts)])
                    seeds = None if point_seeds is None else [
                        mix_seed(point_seeds[b], j, layer) for b, n in zip(owners, counts) for j in range(n)]
                    per_mask = mask_loss(logits, tgt, self.config.seg_points,  # targets at full resolution
                                         bce_weight=self.config.seg_bce_weight,
                                         dice_weight=self.config.seg_dice_weight, reduce=False, seeds=seeds)
                    terms.append(per_mask.new_zeros(len(counts)).index_add(0, sample, per_mask)
                                 / per_mask.new_tensor(counts))
                masks_out = [preds[-1][i, :n] for i, n in enumerate(counts)]
                seg_loss = torch.stack(terms).sum() / max(1, len(seg_masks) - mismatched)
                loss = seg_loss if loss is None else loss + seg_loss
        return OMGLlavaOutput(loss=loss, logits=logits, ce_loss=ce_loss, seg_loss=seg_loss, seg_masks=masks_out,
                              seg_mismatched=mismatched)

    def _run_llm(self, embeds, attention_mask, labels, packed: bool, num_items_in_batch=None):
        """The LLM over (B, T, D) embeddings, padded or packed: logits (B, T, V), last hidden states
        (B, T, D) and the CE loss (None without labels)."""
        loss_kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        if not packed:
            out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels,
                           output_hidden_states=True, use_cache=False, **loss_kwargs)
            return out.logits, out.hidden_states[-1], out.loss
        if attention_mask is None:
            attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        require_packing_support(self.llm)
        rows = pack_rows(attention_mask)
        out = self.llm(inputs_embeds=rows.pack(embeds), labels=None if labels is None else rows.pack_labels(labels),
                       output_hidden_states=True,
                       use_cache=False, **rows.kwargs, **loss_kwargs)
        return rows.unpack(out.logits), rows.unpack(out.hidden_states[-1]), out.loss

    def reconstruction_loss(self, perception: list[Perception]) -> torch.Tensor:
        """Stage 1's extra loss: ``MSE(text2vision(object_mlp(query_proj([Q;E]))), [Q;E])`` over valid queries."""
        qe = torch.cat([p.objects for p in perception])
        if qe.shape[0] == 0:
            return self.text2vision[0].weight.sum() * 0.0
        return self.config.reconstruction_weight * F.mse_loss(self.text2vision(self.projector.objects(qe)), qe)

    # ------------------------------------------------------------------------------------------
    # inference

    @torch.no_grad()
    def generate_with_masks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, perception: list[Perception],
                            prompts: list[dict] | None = None, max_new_tokens: int = 48,
                            eos_token_id: int | None = None, pad_token_id: int | None = None
                            ) -> list[tuple[list[int], torch.Tensor]]:
        """Greedy answers to left-padded prompts; per sample (answer ids up to and excluding the end
        token, the last decoder prediction's mask logits (n_seg, S/4, S/4) of its ``[SEG]`` tokens in
        order). The ``[SEG]`` hidden states come from one forward pass over prompt + answer."""
        self.eval()
        eos = self.config.text_config.eos_token_id if eos_token_id is None else eos_token_id
        input_ids, attention_mask, perception, prompts = to_device((input_ids, attention_mask, perception, prompts),
                                                                   self.device)
        embeds = self.embed(input_ids, perception, prompts)
        gen = self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=eos, pad_token_id=pad_token_id)
        answers = []
        for row in gen.tolist():
            answers.append(row[: row.index(eos)] if eos in row else row)
        width = max(1, max(len(a) for a in answers))
        new = torch.tensor([a + [eos] * (width - len(a)) for a in answers], dtype=torch.long, device=input_ids.device)
        new_mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answers], dtype=attention_mask.dtype,
                                device=attention_mask.device)
        table = self.llm.get_input_embeddings()
        # generated placeholder ids carry no visual input: they are embedded as plain tokens
        full = torch.cat([embeds, table(new.clamp(max=table.num_embeddings - 1))], 1)
        mask = torch.cat([attention_mask, new_mask], 1)
        hidden = self.llm(inputs_embeds=full, attention_mask=mask, output_hidden_states=True,
                          use_cache=False).hidden_states[-1][:, input_ids.shape[1]:]
        seg_id = self.config.token_ids["[SEG]"]
        wheres = [[i for i, t in enumerate(a) if t == seg_id] for a in answers]
        with_seg = [b for b, w in enumerate(wheres) if w]
        decoded = {}
        if with_seg:
            preds, counts = self.decode_segs([hidden[b, wheres[b]] for b in with_seg], [perception[b] for b in with_seg])
            decoded = {b: preds[-1][i, :n] for i, (b, n) in enumerate(zip(with_seg, counts))}
        out = []
        for b, a in enumerate(answers):
            s = perception[b].mask_features.shape[-1]
            out.append((a, decoded.get(b, perception[b].mask_features.new_zeros(0, s, s))))
        return out
