"""
The Conditional Cross Attention network (CCA, Song et al., ICCV 2023) on the R50+ViT-B/16 hybrid.

One backbone, one embedding space per attribute ("condition"): blocks 1..L-1 of a vision
transformer are a shared trunk; the last block L is a cross-attention block whose query is a
learned condition token (paper eq. 2-6); the [CLS] output goes through FC and L2 norm (eq. 7).

    from cca import CCA, CCAConfig, load_checkpoint, load_pretrained
    model = CCA(CCAConfig(arch="vit_r50_b16", num_conditions=8, condition_type=2))
    load_pretrained(model, "R50+ViT-B_16.npz")    # or timm's .safetensors / .bin / .pth
    emb = model(images, conditions)                # (B, out_dim), unit norm
    all_emb = model.embed_all(images)              # (B, K, out_dim): trunk once, every condition
    model, ckpt = load_checkpoint("runs/synthetic/best.pt")   # a train.py checkpoint (layout: "checkpoints" below)

Convert pretrained weights once into a checkpoint that training starts from:

    python cca.py convert R50+ViT-B_16.npz vit_r50_b16_224.pt --img-size 224

The comparison methods of the paper's tables run on the same backbone (`Baseline`): the condition-blind
Triplet network, TF-CSN and TF-ASEN; `build_model(cfg)` picks by `cfg.method`.
Parameter names follow timm's `vit_base_r50_s16_224`, so a timm state dict loads strictly.
"""

import argparse
import json
import math
import os
import shutil
import struct
import zipfile
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# configuration

# The sizes of each architecture. "vit_r50_b16" is the paper's backbone (ViT paper, R50+ViT-B/16); "tiny" is the
# same hybrid structure scaled down so that it trains in minutes on a laptop CPU; "mini" keeps the paper's
# proportions at a small width (12 blocks, so CCA shares 11 of 12 with the baselines; stride 4, an 8 x 8 grid at 32 px).
ARCH_SIZES = {
    "vit_r50_b16": dict(layers=(3, 4, 9), stem_width=64, gn_groups=32, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4),
    "tiny": dict(layers=(1, 1), stem_width=16, gn_groups=8, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4),
    "mini": dict(layers=(1,), stem_width=16, gn_groups=8, embed_dim=64, depth=12, num_heads=8, mlp_ratio=4),
}

METHODS = ("cca", "triplet", "csn", "asen")
# The names the paper's tables give the methods, by (method, condition_type); condition_type is CCA's alone
METHOD_TITLES = {("cca", 1): "CCA (Type-1)", ("cca", 2): "CCA (Type-2)", ("triplet", None): "Triplet network",
                 ("csn", None): "TF-CSN", ("asen", None): "TF-ASEN"}
CSN_PENALTY = dict(embed_reg=5e-3, mask_reg=5e-4)  # TF-CSN's penalty weights (CSNMask): CSN's --embed_loss, --mask_loss


@dataclass
class CCAConfig:
    arch: str = "vit_r50_b16"  # a key of ARCH_SIZES
    num_conditions: int = 8  # K, the number of attributes (FashionAI: 8)
    condition_type: int = 2  # 1: FC(onehot(c)) (eq. 2); 2: FC(ReLU(M[c])) (eq. 3)
    img_size: int = 224
    out_dim: int = 1024  # width of the output embedding (ASEN used 1024)
    method: str = "cca"  # "cca", or a comparison method of the paper's tables: "triplet", "csn", "asen"
    asen_width: int = 0  # TF-ASEN's joint width; 0: ASEN's 512 at D = 768, scaled with D (ASENAttention)
    mask_init: tuple = (0.9, 0.7)  # (mean, std) of the normal that draws Type-2's M: CSN's
    cls_key: bool = True  # block L's keys and values include [CLS]; False: the N patch tokens alone (docs/DESIGN.md)
    cls_residual: bool = True  # block L's attention output is added to [CLS] (eq. 1's residual); False: alone, a diagnostic

    def __post_init__(self):
        if self.arch not in ARCH_SIZES:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {sorted(ARCH_SIZES)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.condition_type not in (1, 2):
            raise ValueError(f"condition_type must be 1 or 2, got {self.condition_type}")
        if self.num_conditions < 1:
            raise ValueError(f"num_conditions must be positive, got {self.num_conditions}")
        if self.img_size < self.stride or self.img_size % self.stride != 0:
            raise ValueError(f"img_size must be a positive multiple of {self.stride}, the output stride of arch {self.arch!r}, "
                             f"got {self.img_size}")
        self.asen_width = self.asen_width or round(self.sizes["embed_dim"] * 512 / 768)

    @property
    def sizes(self):
        return ARCH_SIZES[self.arch]

    @property
    def stride(self):
        # root conv /2, max-pool /2, then every stage after the first halves the grid
        return 4 * 2 ** (len(self.sizes["layers"]) - 1)

    @property
    def grid(self):
        return self.img_size // self.stride


def method_title(cfg):
    """A model's method as the paper's tables name it (METHOD_TITLES)."""
    return METHOD_TITLES[cfg.method, cfg.condition_type if cfg.method == "cca" else None]


# -----------------------------------------------------------------------------
# the ResNet stem of the hybrid (non-pre-activation ResNet with weight standardisation)


def same_pad(size, kernel, stride):
    """TensorFlow 'SAME' padding along one axis: (before, after), the extra pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class StdConv2d(nn.Conv2d):
    """Conv with a weight standardised per output channel, TF-SAME padded (BiT / ViT-hybrid).

    A stride-1 odd kernel pads symmetrically, so that case uses the conv's own padding; a strided conv pads
    asymmetrically (extra pixel right/bottom), which PyTorch's symmetric padding would shift by a pixel against the
    pretrained weights."""

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, eps=1e-8):
        super().__init__(in_ch, out_ch, kernel_size, stride, padding=(kernel_size - 1) // 2 if stride == 1 else 0, bias=False)
        self.eps = eps

    def forward(self, x):
        w = self.weight
        # (w - mean) / sqrt(var + eps), biased variance over (in, kh, kw), as timm's port
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / torch.sqrt(var + self.eps)
        if self.stride[0] > 1:
            k, s = self.kernel_size[0], self.stride[0]
            ph, pw = same_pad(x.shape[-2], k, s), same_pad(x.shape[-1], k, s)
            x = F.pad(x, (*pw, *ph))
        return F.conv2d(x, w, None, self.stride, self.padding)


class Root(nn.Module):
    """StdConv 7x7/2 -> GroupNorm -> ReLU -> max-pool 3x3/2 (SAME padding by -inf)."""

    def __init__(self, width, groups):
        super().__init__()
        self.conv = StdConv2d(3, width, 7, stride=2)
        self.norm = nn.GroupNorm(groups, width, eps=1e-5)

    def forward(self, x):
        x = F.relu(self.norm(self.conv(x)))
        ph, pw = same_pad(x.shape[-2], 3, 2), same_pad(x.shape[-1], 3, 2)
        x = F.pad(x, (*pw, *ph), value=float("-inf"))
        return F.max_pool2d(x, 3, 2)


class Projection(nn.Module):
    """The shortcut of a stage's first unit: 1x1 StdConv with the unit's stride, then GroupNorm."""

    def __init__(self, in_ch, out_ch, stride, groups):
        super().__init__()
        self.conv = StdConv2d(in_ch, out_ch, 1, stride=stride)
        self.norm = nn.GroupNorm(groups, out_ch, eps=1e-5)

    def forward(self, x):
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1, GroupNorm after each conv, ReLU(y + shortcut)."""

    def __init__(self, in_ch, mid, out_ch, stride, groups):
        super().__init__()
        self.downsample = Projection(in_ch, out_ch, stride, groups) if (stride != 1 or in_ch != out_ch) else None
        self.conv1 = StdConv2d(in_ch, mid, 1)
        self.norm1 = nn.GroupNorm(groups, mid, eps=1e-5)
        self.conv2 = StdConv2d(mid, mid, 3, stride=stride)
        self.norm2 = nn.GroupNorm(groups, mid, eps=1e-5)
        self.conv3 = StdConv2d(mid, out_ch, 1)
        self.norm3 = nn.GroupNorm(groups, out_ch, eps=1e-5)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        return F.relu(y + shortcut)


class Stage(nn.Module):
    def __init__(self, in_ch, mid, depth, stride, groups):
        super().__init__()
        out_ch = 4 * mid
        self.blocks = nn.Sequential(*[Bottleneck(in_ch if i == 0 else out_ch, mid, out_ch, stride if i == 0 else 1, groups) for i in range(depth)])

    def forward(self, x):
        return self.blocks(x)


class ResNetStem(nn.Module):
    """The hybrid's CNN: root + stages; output stride 16 for R50 (1024 x 14 x 14 at 224 px)."""

    def __init__(self, layers, width, groups):
        super().__init__()
        self.stem = Root(width, groups)
        stages, in_ch = [], width
        for i, depth in enumerate(layers):
            mid = width * 2**i
            stages.append(Stage(in_ch, mid, depth, 1 if i == 0 else 2, groups))
            in_ch = 4 * mid
        self.stages = nn.Sequential(*stages)
        self.out_channels = in_ch

    def forward(self, x):
        return self.stages(self.stem(x))


class PatchEmbed(nn.Module):
    """ResNet feature map -> 1x1 conv to the token width -> (B, N, D) tokens."""

    def __init__(self, cfg):
        super().__init__()
        s = cfg.sizes
        self.backbone = ResNetStem(s["layers"], s["stem_width"], s["gn_groups"])
        self.proj = nn.Conv2d(self.backbone.out_channels, s["embed_dim"], 1)

    def forward(self, x):
        x = self.proj(self.backbone(x))  # (B, D, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


# -----------------------------------------------------------------------------
# the transformer (paper eq. 1)


class Attention(nn.Module):
    """Multi-head attention with one qkv projection ordered [q | k | v] (eq. 5): the queries come from the tokens x,
    the keys and values from `context`, which is x itself in self-attention (blocks 1..L-1) and the image tokens
    in block L's cross-attention (eq. 6), whose queries are the condition tokens."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x):
        B, N, D = x.shape
        return x.view(B, N, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, heads, N, head_dim)

    def project(self, x, context=None):
        """q of x (B, M, D), k and v of context (B, N, D; default x): each (B, heads, M or N, head_dim)."""
        B, M, D = x.shape
        if context is None:  # self-attention: one fused matmul for q, k and v
            return self.qkv(x).view(B, M, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q = F.linear(x, self.qkv.weight[:D], self.qkv.bias[:D])  # (B, M, D): the query rows of qkv
        k, v = F.linear(context, self.qkv.weight[D:], self.qkv.bias[D:]).split(D, dim=-1)  # each (B, N, D), once for all M queries
        return self.heads(q), self.heads(k), self.heads(v)

    def forward(self, x, context=None):
        B, M, D = x.shape
        x = F.scaled_dot_product_attention(*self.project(x, context))  # softmax(QK^T / sqrt(d)) V: (B, heads, M, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, M, D))

    def weights(self, x, context=None):
        """softmax(QK^T / sqrt(d)), the weights forward() averages the values with: (B, heads, M, N)."""
        q, k, _ = self.project(x, context)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as timm


class Block(nn.Module):
    """Pre-norm transformer block, LayerNorm eps 1e-6."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, dim * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


# -----------------------------------------------------------------------------
# the conditional parts (paper section 3.2)


class ConditionToken(nn.Module):
    """The condition token q_c, Type-1 (eq. 2) or Type-2 (eq. 3)."""

    def __init__(self, cfg):
        super().__init__()
        self.condition_type, K, D = cfg.condition_type, cfg.num_conditions, cfg.sizes["embed_dim"]
        if self.condition_type == 1:
            self.fc = nn.Linear(K, D)  # eq. 2: q_c = FC(onehot(c))
        else:
            # eq. 3: q_c = FC(ReLU(M[c, :])), M the K x D mask table of CSN, by default with CSN's initialisation
            self.mask = nn.Parameter(torch.empty(K, D).normal_(*cfg.mask_init))
            self.fc = nn.Linear(D, D)

    def forward(self, c):
        """c: (...,) long condition indices -> (..., D) condition tokens."""
        if self.condition_type == 1:
            # FC(onehot(c)) picks column c of the weight: index it instead of multiplying by a one-hot
            return self.fc.weight.t()[c] + self.fc.bias
        return self.fc(F.relu(self.mask[c]))


class ConditionalCrossAttentionBlock(Block):
    """Block L (eq. 6): the block's structure and weights, with the attention's query built from the condition token
    and the keys and values from the image tokens.

    Eq. 4 repeats q_c to every token position; every query row is then the same vector, so every row of the attention
    output is too, and only the [CLS] row is read out (eq. 7). One query per condition therefore gives the same [CLS]
    output (tests/test_cca.py proves it). Where the paper is silent (our decision): the condition token is normalised
    by the block's norm1 and projected by the block's query weights, like a token; the attention output is added to
    the [CLS] token, then the block's MLP follows. Keys and values: tokens first_key.. (1 for cfg.cls_key=False: no [CLS]).
    cls_residual=False drops the trunk's [CLS] from the residual (not the paper's model: an ablation, docs/LOG.md)."""
    first_key, cls_residual = 0, True

    def forward(self, x, q_c):
        """x: (B, 1+N, D) trunk tokens; q_c: (B, M, D), M conditions per image -> (B, M, D) [CLS] outputs."""
        cls = self.attn(self.norm1(q_c), context=self.norm1(x[:, self.first_key:]))  # eq. 6
        cls = x[:, :1] + cls if self.cls_residual else cls  # the residual onto [CLS]
        return cls + self.mlp(self.norm2(cls))

    def attention_weights(self, x, q_c):
        """softmax(Q_c K^T / sqrt(d)) over the keys' tokens: (B, heads, M, 1+N), or (B, heads, M, N) from the patches."""
        return self.attn.weights(self.norm1(q_c), context=self.norm1(x[:, self.first_key:]))


class HybridViT(nn.Module):
    """The R50+ViT-B/16 hybrid: patch embedding, [CLS], position embedding, L blocks, final norm, then the
    method's conditional part and the head. Blocks 1..L-1 are the shared trunk; block L is of the class
    `last_block`. One list keeps timm's names, so blocks.{L-1} loads the last pretrained block whatever its kind.
    A subclass is one method: it names block L's class and the class of its conditional part, built from cfg."""

    def __init__(self, cfg, last_block, conditional_part):
        super().__init__()
        self.cfg = cfg
        s = cfg.sizes
        D = s["embed_dim"]
        # block L is built first: the order of the random draws, and so a seed's initial weights, depends on it
        last = last_block(D, s["num_heads"], s["mlp_ratio"])
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid**2, D))
        self.blocks = nn.ModuleList([Block(D, s["num_heads"], s["mlp_ratio"]) for _ in range(s["depth"] - 1)])
        self.blocks.append(last)
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.condition = conditional_part(cfg)  # state dict keys "condition." (the Triplet network's has none)
        self.head = nn.Linear(D, cfg.out_dim)  # eq. 7: f = l2(FC(x_cls)); TF-ASEN's feature_fc
        self.init_weights()

    def embed_and_penalty(self, images, conditions):
        """(forward's embeddings, the method's penalty added to eq. 9's loss: 0-dim float32 on their device, zero but
        for TF-CSN) of a triplet batch [anchors; positives; negatives], as train.py's train_step builds it: images
        torch.cat([a, p, n]), conditions c.repeat(3)."""
        return self(images, conditions), images.new_zeros((), dtype=torch.float32)

    def init_weights(self):
        # ViT-style initialisation for training from scratch; pretrained weights overwrite all but
        # the conditional parts ("condition.") and the head.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("condition"):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def trunk(self, images):
        """The shared representation: (B, 1+N, D) tokens after blocks 1..L-1."""
        x = self.patch_embed(images)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1+N, D)
        for block in self.blocks[:-1]:
            x = block(x)
        return x

    def trunk_parameters(self):
        """The parameters trunk() uses: the stem, [CLS], the position embedding and blocks 1..L-1."""
        return [*self.patch_embed.parameters(), self.cls_token, self.pos_embed, *(p for b in self.blocks[:-1] for p in b.parameters())]

    def backbone_keys(self):
        """The names a pretrained R50+ViT-B/16 provides: everything but the conditional parts and the head."""
        return [k for k in self.state_dict() if not k.startswith(("condition.", "head."))]


class CCA(HybridViT):
    """The Conditional Cross Attention network (paper Fig. 3)."""

    def __init__(self, cfg: CCAConfig):
        if cfg.method != "cca":
            raise ValueError(f"CCA is method 'cca', the config says {cfg.method!r}: use build_model(cfg)")
        super().__init__(cfg, ConditionalCrossAttentionBlock, ConditionToken)  # q_c of eq. 2/3
        self.blocks[-1].first_key, self.blocks[-1].cls_residual = (0 if cfg.cls_key else 1), cfg.cls_residual

    def embed_tokens(self, x, q_c):
        """Block L, final norm, head and L2 norm on trunk tokens x for condition tokens q_c (B, M, D)."""
        cls = self.norm(self.blocks[-1](x, q_c))  # (B, M, D)
        return F.normalize(self.head(cls).float(), dim=-1)  # (B, M, out_dim), eq. 7

    def forward(self, images, conditions):
        """images (B, 3, H, W), conditions (B,) long -> (B, out_dim) unit-norm embeddings."""
        q_c = self.condition(conditions)[:, None]  # (B, 1, D), eq. 2/3, one query per image (eq. 4, see the block)
        return self.embed_tokens(self.trunk(images), q_c)[:, 0]

    def embed_all(self, images):
        """(B, K, out_dim): every condition's embedding, the trunk and its keys/values computed once."""
        x = self.trunk(images)
        q_c = self.condition(torch.arange(self.cfg.num_conditions, device=x.device))  # (K, D)
        return self.embed_tokens(x, q_c.expand(x.shape[0], -1, -1))

    @torch.no_grad()
    def attention_maps(self, images, conditions):
        """(B, heads, N): block L's attention of the condition query over the N patch tokens (the paper's Figure 4), the
        softmax's weights with a [CLS] entry left out; reshape to (B, heads, grid, grid) for a picture."""
        return self.trunk_attention_maps(self.trunk(images), conditions)

    @torch.no_grad()
    def trunk_attention_maps(self, tokens, conditions):  # the same from the trunk's output (B, 1+N, D)
        return self.blocks[-1].attention_weights(tokens, self.condition(conditions)[:, None])[:, :, 0, -self.cfg.grid**2:]


# -----------------------------------------------------------------------------
# the comparison methods of the paper's tables, on the same backbone (all L blocks self-attention)


class ConditionalPart(nn.Module):
    """A comparison method's conditional part: part(x, c, head) is the (B, out_dim) embedding, before the L2 norm, of
    the final-normed tokens x (B, 1+N, D) under conditions c (B,). Defaults: no penalty, K calls for K conditions."""

    def __init__(self, cfg):
        super().__init__()
        self.method = cfg.method  # for the messages

    def embed_and_penalty(self, x, c, head):
        return self(x, c, head), x.new_zeros((), dtype=torch.float32)

    def embed_all(self, embed, x, K):
        """(B, K, out_dim): embed(x, c), the model's unit-norm embedding, under each of the K conditions."""
        return torch.stack([embed(x, torch.full((x.shape[0],), k, device=x.device)) for k in range(K)], dim=1)

    def attention_maps(self, x, c):
        raise ValueError(f"method {self.method!r} has no condition-dependent attention map to show")


class TripletEmbedding(ConditionalPart):
    """The tables' Triplet network: one embedding for every condition, l2(FC(x_cls)); no parameters."""

    def forward(self, x, c, head):
        return head(x[:, 0])  # (B, out_dim), the condition unused

    def embed_all(self, embed, x, K):
        return embed(x, None)[:, None].expand(-1, K, -1).contiguous()  # one space: computed once


class CSNMask(ConditionalPart):
    """TF-CSN (paper Table 2, after CSN, Veit et al., CVPR 2017): a learned mask per condition on the embedding,
    f = l2(FC(x_cls) * ReLU(M[c])), M initialised as CSN's normal(0.9, 0.7). Its training penalty is CSN's two
    regularisers in their form (CSN's main.py, csn.py, tripletnet.py), over a triplet batch of B:
        embed_reg * mean_t ||E_t||_F / sqrt(B)  +  mask_reg * ||ReLU(M[c])||_1 / B
    E_t (B, out_dim) is FC(x_cls) of the anchors, positives or negatives before the mask (CSN's embeddingnet output), so
    the first is the root mean square of the images' norms, not squared; embed_reg and mask_reg are plain attributes,
    CSN_PENALTY unless train.py sets them (0 drops a term). CSN compares masked embeddings unnormalised, by Euclidean
    distance: the first keeps them in a ball (scaled up, they would meet any margin), the second makes the masks sparse.
    Eq. 9's cosine would make a penalty on the output (norm 1) a constant, so they act where CSN puts them, on FC(x_cls)
    and the masks, scales the loss is blind to: trading against no margin, they shrink both, which for a scale-free loss
    sets each Adam step's size relative to them (as weight decay on a normalised layer), and the L1 term still zeroes
    the mask entries the loss does not need. On the method's own parts, with CSN's untuned values: part of TF-CSN."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.mask = nn.Parameter(torch.empty(cfg.num_conditions, cfg.out_dim).normal_(mean=0.9, std=0.7))
        self.embed_reg, self.mask_reg = CSN_PENALTY["embed_reg"], CSN_PENALTY["mask_reg"]

    def forward(self, x, c, head):
        return head(x[:, 0]) * F.relu(self.mask[c])  # (B, out_dim)

    def embed_and_penalty(self, x, c, head):
        emb, mask = head(x[:, 0]), F.relu(self.mask[c])  # (3B, out_dim) each: [anchors; positives; negatives]
        B = emb.shape[0] // 3  # each as (3, B, out_dim) below
        embed = emb.view(3, B, -1).float().flatten(1).norm(dim=1).mean() / math.sqrt(B)  # mean_t ||E_t||_F / sqrt(B)
        l1 = mask.view(3, B, -1).float().abs().sum() / (3 * B)  # ||ReLU(M[c])||_1 / B, averaged over the three
        return emb * mask, self.embed_reg * embed + self.mask_reg * l1


class ASENAttention(ConditionalPart):
    """TF-ASEN (paper Table 2 and section 4, "SOTA models applied Transformer"): ASEN's ASENet (Ma et al., AAAI 2020;
    the authors' model.py) on the last layer's patch tokens, read as the grid ASEN's CNN map would be. With
    a = onehot(c), the N tokens x_n (width D) and tanh before the softmax as ASEN has it:
      attribute-aware spatial attention   p_n = tanh(W_s x_n + b_s) * tanh(A_s a)       (512 wide)
                                          s = softmax_n(tanh(w_p . p_n + b_p)),  v = sum_n s_n x_n
      attribute-aware channel attention   q = ReLU(A_c a)                                (D wide)
                                          w = sigmoid(W_2 ReLU(W_1 [v, q] + b_1) + b_2),  u = v * w
    and the model's head gives FC(u), ASEN's feature_fc, before the model's L2 norm. The logit goes through tanh,
    so it lies in [-1, 1] and one location gets at most e^2 / (e^2 + N - 1) of the weight (3.7% of 196 locations at
    224 px) however large the weights grow: ASEN's spatial attention is soft by construction. A 1x1 conv on a grid is
    a Linear layer on its tokens (the same weights up to a reshape): we keep the tokens, sparing two reshapes. ASEN's
    512 (the spatial attention's joint width, the channel attention's hidden width) is kept at ViT-B's width D = 768 and
    scaled with D at the small archs (85 at tiny's 128), so that the part is as large beside the backbone; its 1024,
    the width of its feature map (ResNet-50's third stage), is the token width D, as the attended feature, the channel
    weights and the attribute's channel vector meet the tokens element by element. Biases and initialisation follow
    ASEN: no bias in the two attribute FCs, one in the projections and the two channel FCs, PyTorch's default
    initialisation. What differs from ASENet, and why: the features are the ViT's last-block tokens after its final
    LayerNorm (the backbone's output, as for every method here), not the ResNet's post-ReLU map, and [CLS] is left
    out, as ASEN's map has none; ASEN's feature_fc (1024 -> 1024) is the model's `head` (D -> out_dim), initialised
    like every method's head (truncated normal, std 0.02, zero bias) to load and train as theirs do; the grid follows
    the image (ASEN fixes 14 x 14); the one-hot's bias-free FC is a column lookup of its weight (the same product)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        K, D, joint = cfg.num_conditions, cfg.sizes["embed_dim"], cfg.asen_width
        self.attr_spatial = nn.Linear(K, joint, bias=False)  # spatial attention: A_s, ASEN's mask_fc1
        self.feat_proj = nn.Linear(D, joint)  # W_s, ASEN's conv1 (1x1)
        self.score = nn.Linear(joint, 1)  # w_p, ASEN's conv2 (1x1, to one channel)
        self.attr_channel = nn.Linear(K, D, bias=False)  # channel attention: A_c, ASEN's mask_fc2
        self.channel = nn.Sequential(nn.Linear(2 * D, joint), nn.ReLU(), nn.Linear(joint, D))  # W_1, W_2: fc1, fc2

    def spatial(self, tokens, c):
        """tokens (B, N, D), c (B,) -> the softmax weights over the N locations, (B, N)."""
        attr = torch.tanh(self.attr_spatial.weight.t()[c])  # (B, 512): tanh(A_s onehot(c))
        p = torch.tanh(self.feat_proj(tokens)) * attr[:, None]  # (B, N, 512)
        return torch.softmax(torch.tanh(self.score(p).squeeze(-1)), dim=-1)  # tanh bounds the logits to [-1, 1]

    def forward(self, x, c, head):
        tokens = x[:, 1:]  # (B, N, D): the patch tokens
        v = torch.einsum("bn,bnd->bd", self.spatial(tokens, c), tokens)  # (B, D): attention-weighted sum
        q = F.relu(self.attr_channel.weight.t()[c])  # (B, D): ReLU(A_c onehot(c))
        w = torch.sigmoid(self.channel(torch.cat([v, q], dim=-1)))  # (B, D) channel weights
        return head(v * w)  # (B, out_dim): FC(u)

    def attention_maps(self, x, c):
        return self.spatial(x[:, 1:], c)[:, None]  # (B, 1, N)


class Baseline(HybridViT):
    """The plain hybrid ViT (every block self-attention) with a comparison method's conditional part, then L2 norm."""

    def __init__(self, cfg: CCAConfig):
        if cfg.method == "cca":
            raise ValueError("method 'cca' is the CCA class: use build_model(cfg)")
        super().__init__(cfg, Block, {"triplet": TripletEmbedding, "csn": CSNMask, "asen": ASENAttention}[cfg.method])

    def features(self, images):
        return self.norm(self.blocks[-1](self.trunk(images)))  # (B, 1+N, D)

    def embed(self, x, c):  # (B, out_dim) unit-norm embeddings of final-normed tokens x (B, 1+N, D)
        return F.normalize(self.condition(x, c, self.head).float(), dim=-1)

    def forward(self, images, conditions):
        return self.embed(self.features(images), conditions)

    def embed_and_penalty(self, images, conditions):
        emb, penalty = self.condition.embed_and_penalty(self.features(images), conditions, self.head)
        return F.normalize(emb.float(), dim=-1), penalty

    def embed_all(self, images):  # (B, K, out_dim), the features computed once
        return self.condition.embed_all(self.embed, self.features(images), self.cfg.num_conditions)

    @torch.no_grad()
    def attention_maps(self, images, conditions):
        """The part's condition-dependent attention map (TF-ASEN's spatial attention, (B, 1, N)); others have none."""
        return self.trunk_attention_maps(self.trunk(images), conditions)

    @torch.no_grad()
    def trunk_attention_maps(self, tokens, conditions):  # the same from the trunk's output (B, 1+N, D)
        return self.condition.attention_maps(self.norm(self.blocks[-1](tokens)), conditions)


def build_model(cfg: CCAConfig):
    """CCA for method "cca", else the baseline of that method on the same backbone."""
    return CCA(cfg) if cfg.method == "cca" else Baseline(cfg)


# -----------------------------------------------------------------------------
# pretrained weights: Google's npz (ViT paper's release) and timm's port


def read_safetensors(path):
    """Read a .safetensors file with numpy alone: 8-byte little-endian header length, JSON header, raw data."""
    dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32, "U8": np.uint8}
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        size = os.path.getsize(path)
        if n > size - 8:
            raise ValueError(f"{path}: safetensors header of {n} bytes runs past the end of the {size}-byte file (truncated?)")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise ValueError(f"{path}: key {key!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if end > len(data):
            raise ValueError(f"{path}: key {key!r} ends at byte {end} of a {len(data)}-byte data section (truncated file)")
        a = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":  # bfloat16 is the top half of a float32
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[key] = torch.from_numpy(a.copy())
    return out


def google_to_timm(npz, cfg, path):
    """Map Google's R50+ViT-B_16.npz keys to timm's names, with its layout changes: HWIO convs to OIHW,
    (in, out) dense kernels transposed, per-head q/k/v kernels flattened and concatenated into qkv.
    Returns (state dict, ignored keys). A file saved with its optimizer state keeps the weights under opt/target/;
    its other keys (opt/state/...) are not weights: ignored, and returned so that the loader can say so. The
    classifier heads come back under timm's names (head., pre_logits.) for the loader to drop and report.

    Every expected key must be present; unknown keys other than the classifier heads are an error.
    """
    prefix = "opt/target/" if any(k.startswith("opt/target/") for k in npz) else ""
    ignored = sorted(k for k in npz if not k.startswith(prefix))
    used, sd = set(ignored), {}

    def take(key):
        if prefix + key not in npz:
            raise ValueError(f"{path}: missing key {prefix + key!r} of Google's R50+ViT-B/16 layout")
        used.add(prefix + key)
        return torch.from_numpy(np.asarray(npz[prefix + key], dtype=np.float32))

    def conv(key):  # HWIO -> OIHW
        return take(key).permute(3, 2, 0, 1)

    def norm(dst, src):  # a GroupNorm's or LayerNorm's scale and bias, maybe stored (1, 1, 1, C)
        sd[dst + ".weight"], sd[dst + ".bias"] = take(src + "/scale").reshape(-1), take(src + "/bias").reshape(-1)

    sd["cls_token"] = take("cls")
    sd["pos_embed"] = take("Transformer/posembed_input/pos_embedding")
    sd["patch_embed.backbone.stem.conv.weight"] = conv("conv_root/kernel")
    norm("patch_embed.backbone.stem.norm", "gn_root")
    for s, n_units in enumerate(cfg.sizes["layers"]):
        for u in range(n_units):
            src, dst = f"block{s + 1}/unit{u + 1}/", f"patch_embed.backbone.stages.{s}.blocks.{u}."
            for i in (1, 2, 3):
                sd[dst + f"conv{i}.weight"] = conv(src + f"conv{i}/kernel")
                norm(dst + f"norm{i}", src + f"gn{i}")
            if u == 0:
                sd[dst + "downsample.conv.weight"] = conv(src + "conv_proj/kernel")
                norm(dst + "downsample.norm", src + "gn_proj")
    sd["patch_embed.proj.weight"] = conv("embedding/kernel")
    sd["patch_embed.proj.bias"] = take("embedding/bias")
    D = cfg.sizes["embed_dim"]
    for i in range(cfg.sizes["depth"]):
        src, dst = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        att = src + "MultiHeadDotProductAttention_1/"
        norm(dst + "norm1", src + "LayerNorm_0")
        # query/key/value kernels (D, heads, head_dim) -> (D, D) -> (out, in); concatenated [q; k; v]
        sd[dst + "attn.qkv.weight"] = torch.cat([take(att + f"{n}/kernel").reshape(D, D).t() for n in ("query", "key", "value")])
        sd[dst + "attn.qkv.bias"] = torch.cat([take(att + f"{n}/bias").reshape(-1) for n in ("query", "key", "value")])
        sd[dst + "attn.proj.weight"] = take(att + "out/kernel").reshape(D, D).t()  # (heads, head_dim, D) -> (out, in)
        sd[dst + "attn.proj.bias"] = take(att + "out/bias")
        norm(dst + "norm2", src + "LayerNorm_2")
        for j in (0, 1):
            sd[dst + f"mlp.fc{j + 1}.weight"] = take(src + f"MlpBlock_3/Dense_{j}/kernel").t()
            sd[dst + f"mlp.fc{j + 1}.bias"] = take(src + f"MlpBlock_3/Dense_{j}/bias")
    norm("norm", "Transformer/encoder_norm")
    for key in [k[len(prefix):] for k in npz if k not in used and k[len(prefix):].startswith(("head/", "pre_logits/"))]:
        t = take(key)  # the classifiers: head/kernel (D, classes) is timm's head.weight transposed
        name = {"head/kernel": "head.weight", "head/bias": "head.bias", "pre_logits/kernel": "pre_logits.fc.weight",
                "pre_logits/bias": "pre_logits.fc.bias"}.get(key, key.replace("/", "."))
        sd[name] = t.t() if key.endswith("/kernel") and t.dim() == 2 else t
    unknown = [k for k in npz if k not in used]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} keys not in Google's R50+ViT-B/16 layout for arch {cfg.arch!r}, e.g. {unknown[:3]}")
    return sd, ignored


def read_weights(path, cfg):
    """Read any supported weight file into a dict of timm-named tensors (heads not yet dropped) and the list of the
    file's keys that hold no weights (an npz's optimizer state)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if path.endswith(".safetensors"):
        return read_safetensors(path), []
    if magic == b"PK\x03\x04" and path.endswith(".npz"):
        try:
            with np.load(path) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
            raise ValueError(f"{path}: cannot read as an .npz archive (truncated or corrupt?): {e}") from e
        return google_to_timm(arrays, cfg, path)
    if magic == b"PK\x03\x04" or path.endswith((".pth", ".pt", ".bin")):
        obj = torch_load(path)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]  # converted by this project (cca.py convert)
        elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            obj = obj["model"]  # a training checkpoint of this project
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{path}: expected a state dict of tensors")
        return obj, []
    raise ValueError(f"{path}: unknown weight format (expected Google's .npz, timm's .safetensors/.bin/.pth, or a .pt from 'cca.py convert')")


def resize_pos_embed(pos, grid):
    """Bilinear resize of a (1, 1+n*n, D) position embedding to (1, 1+grid*grid, D); [CLS] kept apart."""
    cls, patches = pos[:, :1], pos[:, 1:]
    n = math.isqrt(patches.shape[1])
    if n * n != patches.shape[1]:
        raise ValueError(f"position embedding with {patches.shape[1]} patch positions is not a square grid")
    patches = patches.reshape(1, n, n, -1).permute(0, 3, 1, 2)  # (1, D, n, n)
    patches = F.interpolate(patches, size=(grid, grid), mode="bilinear", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def load_pretrained(model: HybridViT, path: str, verbose: bool = True) -> dict:
    """Load R50+ViT-B/16 weights into the stem and blocks 1..L; block L's weights also initialise the
    cross-attention block (it has the same parameters). Returns a report dict of key lists."""
    sd, ignored = read_weights(path, model.cfg)
    dropped = sorted(k for k in sd if k.startswith(("head.", "pre_logits.", "fc_norm.", "condition.")))
    sd = {k: v for k, v in sd.items() if k not in dropped}
    own = model.state_dict()
    expected = model.backbone_keys()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit arch {model.cfg.arch!r}: {len(missing)} missing keys (e.g. {missing[:3]}), "
                       f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    resized = []
    if sd["pos_embed"].shape != own["pos_embed"].shape and sd["pos_embed"].shape[-1] == own["pos_embed"].shape[-1]:
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"].float(), model.cfg.grid)
        resized.append("pos_embed")
    for k in expected:
        if sd[k].shape != own[k].shape:
            raise ValueError(f"{path}: key {k!r} has shape {tuple(sd[k].shape)}, the model expects {tuple(own[k].shape)}")
    new = [k for k in own if k not in expected]
    model.load_state_dict({**{k: own[k] for k in new}, **{k: sd[k] for k in expected}}, strict=True)
    report = dict(loaded=expected, new=new, dropped=dropped, resized=resized, ignored=ignored)
    if verbose:
        n_new = sum(own[k].numel() for k in new)
        print(f"loaded {len(expected)} tensors from {path}; resized {resized or 'nothing'}; "
              f"dropped {dropped or 'nothing'}; newly initialised: {new} ({n_new:,} parameters)"
              + (f"; ignored {len(ignored)} keys outside opt/target/, not weights (e.g. {ignored[:3]})" if ignored else ""))
    return report


def convert(src, dst, img_size=224, arch="vit_r50_b16"):
    """Write weights of any supported layout as a timm-named backbone state dict for `img_size`."""
    model = CCA(CCAConfig(arch=arch, img_size=img_size))
    load_pretrained(model, src)
    save_backbone(model, dst, os.path.basename(src))


# -----------------------------------------------------------------------------
# checkpoints: the two files this project writes, and reading them back

# A training checkpoint (train.py writes OUT_DIR/last.pt every epoch and OUT_DIR/best.pt on a new best) is one dict
# of tensors and plain Python types, so that torch.load(weights_only=True) reads it without running any code:
#
#     model        the model's state dict: the plain model, not torch.compile'd, not wrapped in DDP
#     config       asdict(CCAConfig): rebuilds the model (build_model(CCAConfig(**ckpt["config"])))
#     meta         the dataset's meta (data.load_meta): name, format ("asen" or "zappos"), attributes (their names)
#                  and values (each attribute's value names; empty lists for zappos)
#     args         vars() of train.py's flags (data_root: where evaluate.py finds the data by default)
#     epoch        the last finished epoch, counted from 0
#     optimizer    the optimizer's state dict (two param groups: trunk, rest)
#     scheduler    the learning-rate scheduler's state dict
#     best_metric  the best validation total so far (-1.0 before the first validation)
#     history      one dict per finished epoch: epoch, lr and, after a validation, the scores under "valid"
#
# Evaluating needs CHECKPOINT_KEYS (model, config, meta, args, epoch); resuming needs RESUME_KEYS as well.
# A backbone file ('cca.py convert', 'compare.py pretrain'; what --pretrained reads) is {"format": "cca-backbone",
# "arch", "img_size", "source", "state_dict"}, state_dict holding the model's backbone_keys() only (read_weights
# reads it, and the "model" of a training checkpoint too).
# Both are written to a temporary name beside PATH and then renamed to PATH (save_atomic), so that a run stopped while writing
# leaves the previous file whole.

CHECKPOINT_KEYS = ("model", "config", "meta", "args", "epoch")  # what evaluating needs
RESUME_KEYS = ("optimizer", "scheduler", "best_metric", "history")  # what resuming needs as well


def save_atomic(obj, path):
    """torch.save to a temporary name of this process's own beside `path`, then rename: `path` is always whole. A failed
    write (full disk, read-only folder) removes the temporary file, keeps `path` and raises OSError saying how much."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:  # torch.save reports a full disk as RuntimeError ("unexpected pos ..."); or Ctrl-C
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise OSError(f"{path}: not written: the folder {folder} does not exist") from None
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"{path}: not written ({cause}); it needs about {tensor_bytes(obj) / 2**20:,.0f} MiB, "
                      f"{shutil.disk_usage(folder).free / 2**20:,.0f} MiB are free in {folder}; any earlier file there is "
                      "intact") from None


def tensor_bytes(obj):
    """The bytes of every tensor in a nest of dicts, lists and tuples: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(tensor_bytes(v) for v in items)


def save_checkpoint(path, model, optimizer, scheduler, epoch, best, args, meta, history):
    """One dict that suffices to resume and to evaluate (the layout above); `model` the plain, unwrapped model."""
    save_atomic(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), epoch=epoch,
                     best_metric=best, config=asdict(model.cfg), args=vars(args), meta=meta, history=history), path)


def save_backbone(model, dst, source):
    """Write the model's backbone (backbone_keys) as the backbone file above, the .pt that --pretrained reads."""
    state = model.state_dict()
    sd = {k: state[k] for k in model.backbone_keys()}
    save_atomic({"format": "cca-backbone", "arch": model.cfg.arch, "img_size": model.cfg.img_size, "source": source, "state_dict": sd}, dst)
    print(f"wrote {dst}: {len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} parameters, img_size {model.cfg.img_size}")


def torch_load(path):
    """torch.load(path, weights_only=True) on the CPU: tensors and plain types only, never code. A file it cannot
    read raises a ValueError naming the file and the cause, without PyTorch's advice to retry with
    weights_only=False: that would run whatever code the file holds, and the file may not be the user's own."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        if "WeightsUnpickler error:" in text:  # the cause sits between PyTorch's advice and its pointer to the docs
            text = text.split("WeightsUnpickler error:", 1)[1]
        cause = text.strip().split("\n")[0].split(". ")[0].rstrip(".")
        raise ValueError(f"{path}: cannot read as a PyTorch file ({type(e).__name__}: {cause}): truncated, corrupt, "
                         f"or not a checkpoint") from None


def read_checkpoint(path, keys=CHECKPOINT_KEYS):
    """A train.py checkpoint as a dict, on the CPU; raises naming the file if it is missing, a folder, unreadable
    or lacks `keys`."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder, not a checkpoint: give its best.pt or last.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch_load(path)
    missing = [k for k in keys if k not in ckpt] if isinstance(ckpt, dict) else ["everything"]
    if missing:
        raise ValueError(f"{path}: not a train.py checkpoint (no {', '.join(missing)})")
    return ckpt


def load_model_state(model, state, path):
    """model.load_state_dict(state), strict; raises ValueError with one line naming what does not fit, not torch's list."""
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        what = "; ".join(f"{len(keys)} {name}, e.g. {', '.join(keys[:2])}" for name, keys in
                         (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if keys)
        raise ValueError(f"{path}: the weights do not fit the {model.cfg.method} model of its config: {what}")
    model.load_state_dict(state)


def load_checkpoint(path, device="cpu"):
    """(model, checkpoint dict) from a train.py checkpoint; the model in eval mode on `device`."""
    ckpt = read_checkpoint(path)
    model = build_model(CCAConfig(**{"asen_width": 512, **ckpt["config"]}))  # before 2026-12-02 TF-ASEN was 512 wide at every size
    load_model_state(model, ckpt["model"], path)
    return model.to(device).eval(), ckpt


# -----------------------------------------------------------------------------
# sizes


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="CCA model utilities")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("convert", help="convert R50+ViT-B/16 weights (Google .npz, timm .safetensors/.bin/.pth) to a .pt that training starts from")
    p.add_argument("src", help="the pretrained weight file")
    p.add_argument("dst", help="output .pt path")
    p.add_argument("--img-size", type=int, default=224, help="image size the position embedding is resized for (224 or 384)")
    p.add_argument("--arch", default="vit_r50_b16", choices=sorted(ARCH_SIZES), help="architecture the weights are for")
    p = sub.add_parser("info", help="print the parameter counts of an architecture")
    p.add_argument("--arch", default="vit_r50_b16", choices=sorted(ARCH_SIZES), help="architecture")
    p.add_argument("--num-conditions", type=int, default=8, help="number of conditions K")
    p.add_argument("--img-size", type=int, default=224, help="image size")
    args = parser.parse_args()
    if args.cmd == "convert":
        try:
            convert(args.src, args.dst, args.img_size, args.arch)
        except (OSError, ValueError) as e:  # a missing, truncated or unfitting weight file; a bad --img-size
            raise SystemExit(f"error: {e}")
    else:
        for t in (1, 2):
            try:
                m = CCA(CCAConfig(arch=args.arch, num_conditions=args.num_conditions, condition_type=t, img_size=args.img_size))
            except ValueError as e:  # -K 0, an image size the stem cannot take
                raise SystemExit(f"error: {e}")
            print(f"{args.arch} type-{t}: total {count_parameters(m):,}; backbone {count_parameters(m) - count_parameters(m.condition) - count_parameters(m.head):,}; "
                  f"condition token {count_parameters(m.condition):,}; head {count_parameters(m.head):,}")
