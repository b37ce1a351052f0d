"""groundlab.shared: the thin library the groundlab paper packages share.

Attention dispatch (flash-attn -> SDPA -> eager), LoRA through peft, distributed / DeepSpeed helpers,
multimodal embedding splicing and label masking, the papers' metrics, the offline world tokenizer,
and the synthetic shapes world with its COCO / REFER writers. Nothing paper-specific lives here.
Import the submodules directly, e.g. ``from groundlab.shared.world import World``.
"""

__version__ = "0.1.0"
