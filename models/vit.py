"""A Vision Transformer (Dosovitskiy et al. 2021) for 32x32 images, as in Fisher, Meng & Papyan (2024):
4x4 patches (64 tokens) and a class token with learned position embeddings, 6 pre-norm blocks of
multi-head attention and a GELU MLP (ratio 4), embedding 6 * width (384 at width 64), 64 dimensions
per head. The features are the final LayerNorm of the class token.

Stages: "block1" to "block6", read out as the class token after each block, and "features". The class
token entering block1 is the same for every image, so it is no stage."""
import torch
import torch.nn as nn

from models.stages import StagedNetwork

IMAGE_SIZE = 32
PATCH = 4
DEPTH = 6


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(x)
        x = x + self.attention(normed, normed, normed, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(StagedNetwork):
    def __init__(self, in_channels: int, num_classes: int, width: int):
        super().__init__()
        dim = 6 * width
        heads = max(1, dim // 64)
        while dim % heads:
            heads -= 1
        tokens = (IMAGE_SIZE // PATCH) ** 2
        self.patches = nn.Conv2d(in_channels, dim, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(dim)
        self.stage_names = (*(f"block{block}" for block in range(1, DEPTH + 1)), "features")
        self.fc = nn.Linear(dim, num_classes)

    def _readouts(self, x: torch.Tensor, every: bool) -> list[torch.Tensor]:
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"the ViT takes {IMAGE_SIZE}x{IMAGE_SIZE} images, not {tuple(x.shape[-2:])}; "
                             "pick a CNN for this dataset")
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.position
        class_tokens = []
        for block in self.blocks:
            tokens = block(tokens)
            if every:
                class_tokens.append(tokens[:, 0])
        return [*class_tokens, self.norm(tokens[:, 0])]
