"""Where the blocks are: find a model's transformer blocks and sort every other parameter.

GRASS trains a few *blocks* (transformer layers) at a time. Everything outside the blocks
is *always-trained* unless switched off: the embeddings (token/position embeddings and their
norm) and the head (final norm, LM head, classifier, pooler, and anything else a user added).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Where Hugging Face families keep their blocks, relative to the task model. A model wrapped
# in a LightningModule or a peft model is found by suffix (see `find_blocks`).
KNOWN_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Gemma2, Phi-3 (ForCausalLM and base models)
    "layers",
    "transformer.h",  # GPT-2
    "h",
    "gpt_neox.layers",  # GPT-NeoX
    "model.decoder.layers",  # OPT
    "decoder.layers",
    "encoder.layer",  # BERT, RoBERTa, ELECTRA, DeBERTa (base models and *For* heads as bert./roberta.encoder.layer)
    "transformer.layer",  # DistilBERT (distilbert.transformer.layer)
)


@dataclass(frozen=True)
class BlockLayout:
    """The blocks of a model and the roles of its other parameters.

    ``embeddings`` and ``head`` hold parameters outside the blocks. A parameter tied to both
    (GPT-2/SmolLM2 share the embedding matrix with the LM head) is listed in both.
    """

    path: str
    blocks: tuple[nn.Module, ...]
    embeddings: tuple[nn.Parameter, ...]
    head: tuple[nn.Parameter, ...]

    def __len__(self) -> int:
        return len(self.blocks)

    def block_params(self, index: int) -> list[nn.Parameter]:
        return list(self.blocks[index].parameters())

    def always_trained(self, train_embeddings: bool, train_head: bool) -> list[nn.Parameter]:
        """Parameters outside the blocks that train in every step.

        A tied parameter trains only when both of its roles are switched on: freezing the
        embeddings must not keep updating them through the LM head that shares them.
        """
        frozen = set()
        if not train_embeddings:
            frozen.update(map(id, self.embeddings))
        if not train_head:
            frozen.update(map(id, self.head))
        seen, kept = set(), []
        for p in (*self.embeddings, *self.head):
            if id(p) not in frozen and id(p) not in seen:
                seen.add(id(p))
                kept.append(p)
        return kept

    def tied(self) -> list[nn.Parameter]:
        head = set(map(id, self.head))
        return [p for p in self.embeddings if id(p) in head]


def find_blocks(model: nn.Module, path: str | None = None) -> BlockLayout:
    """Locate the transformer blocks of ``model`` and sort the remaining parameters.

    Args:
        model: any module; usually a LightningModule holding a Hugging Face model.
        path: dotted path to an ``nn.ModuleList`` of blocks, relative to ``model``
            (e.g. ``"model.model.layers"``). ``None`` searches the known Hugging Face layouts.

    Raises:
        ValueError: if ``path`` does not resolve to a module list, or no blocks are found.
    """
    if path is None:
        path = _discover(model)
    blocks = _resolve(model, path)
    block_ids = {id(p) for p in blocks.parameters()}
    embeddings, head = [], []
    seen_emb, seen_head = set(), set()
    for name, module in model.named_modules(remove_duplicate=False):
        is_embedding = isinstance(module, nn.Embedding) or "embed" in name.rsplit(".", 1)[-1].lower()
        for p in module.parameters(recurse=False):
            if id(p) in block_ids:
                continue
            if is_embedding or _inside_embeddings(name):
                if id(p) not in seen_emb:
                    seen_emb.add(id(p))
                    embeddings.append(p)
            elif id(p) not in seen_head:
                seen_head.add(id(p))
                head.append(p)
    return BlockLayout(path, tuple(blocks), tuple(embeddings), tuple(head))


def _inside_embeddings(module_name: str) -> bool:
    # BERT keeps a LayerNorm inside `embeddings`; it belongs with them.
    return any("embed" in part.lower() for part in module_name.split(".")[:-1])


def _resolve(model: nn.Module, path: str) -> nn.ModuleList:
    module = model
    for i, part in enumerate(path.split(".")):
        if not hasattr(module, part) or not isinstance(getattr(module, part), nn.Module):
            where = ".".join(path.split(".")[:i]) or type(model).__name__
            raise ValueError(
                f"blocks={path!r} does not resolve: {where} has no submodule {part!r}. "
                f"Pass the dotted path of the nn.ModuleList that holds the transformer blocks."
            )
        module = getattr(module, part)
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        raise ValueError(
            f"blocks={path!r} resolves to a {type(module).__name__}, not a non-empty nn.ModuleList "
            f"of transformer blocks."
        )
    return module


def _discover(model: nn.Module) -> str:
    """The largest module list whose dotted name ends in a known block path."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and _homogeneous(module):
            if any(name == known or name.endswith("." + known) for known in KNOWN_BLOCK_PATHS):
                found.append((sum(p.numel() for p in module.parameters()), name))
    if not found:
        raise ValueError(
            f"No transformer blocks found in {type(model).__name__}: none of its module lists "
            f"ends in {', '.join(KNOWN_BLOCK_PATHS)}. Pass blocks='dotted.path.to.layers'."
        )
    return max(found)[1]


def _homogeneous(modules: nn.ModuleList) -> bool:
    return len({type(m) for m in modules}) == 1
