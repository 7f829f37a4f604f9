"""Tests of cca.py: sizes, the equations of the paper against written-out forms, weight loading.

Weight files are written by the tests themselves from randomly initialised models, each layout by an
inverse mapping written here independently of cca.py.
"""

import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cca import ARCH_SIZES, CCA, CCAConfig, build_model, count_parameters, load_pretrained, resize_pos_embed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")  # key lists of the real checkpoint layouts


def tiny(condition_type=2, num_conditions=5, img_size=64, seed=0, cls_key=True, cls_residual=True):
    torch.manual_seed(seed)
    model = CCA(CCAConfig(arch="tiny", num_conditions=num_conditions, condition_type=condition_type, img_size=img_size, out_dim=32,
                          cls_key=cls_key, cls_residual=cls_residual))
    randomise_norms(model)
    return model.eval()


def randomise_norms(model):
    # GroupNorm/LayerNorm start as the identity; random affine parameters make the tests see them
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


# -----------------------------------------------------------------------------
# sizes


def test_backbone_parameter_count_matches_timm_layout():
    model = CCA(CCAConfig(arch="vit_r50_b16", num_conditions=8, condition_type=2, out_dim=1024))
    backbone = count_parameters(model) - count_parameters(model.condition) - count_parameters(model.head)
    assert backbone == 97_890_112  # timm's vit_base_r50_s16_224 without its head
    assert count_parameters(model.patch_embed.backbone) == 11_894_848
    assert count_parameters(model.patch_embed.proj) == 787_200
    assert count_parameters(model.blocks[0]) == count_parameters(model.blocks[-1]) == 7_087_872
    # what CCA adds for K = 8 conditions, D = 768: Type-2 is the mask table (K x D) plus an FC D -> D
    assert count_parameters(model.condition) == 8 * 768 + 768 * 768 + 768 == 596_736
    assert count_parameters(model.head) == 768 * 1024 + 1024 == 787_456
    type1 = CCA(CCAConfig(arch="vit_r50_b16", num_conditions=8, condition_type=1, out_dim=1024))
    assert count_parameters(type1.condition) == 8 * 768 + 768 == 6_912  # FC from a K-way one-hot to D


def test_small_archs_parameter_counts_and_the_conditional_parts_share_of_the_backbone():
    """Pinned counts of the small archs (K = 5, out_dim 1024, 32 px); "mini" keeps the paper's proportions: 12 blocks, an
    8 x 8 grid, and each method's conditional part about as large beside the backbone as at ViT-B (CCA-2 0.61%, TF-ASEN
    1.62%), TF-ASEN's 512 scaled with the width."""
    def counts(arch, method, **kw):
        m = build_model(CCAConfig(arch=arch, num_conditions=5, img_size=32, method=method, **kw))
        n, part, head = count_parameters(m), count_parameters(m.condition), count_parameters(m.head)
        return n, part, part / (n - part - head), m.cfg
    assert counts("tiny", "cca")[:2] == (992_912, 5 * 128 + 128 * 128 + 128)
    assert counts("tiny", "asen")[:2] == (1_020_729, 44_969) and counts("tiny", "asen")[3].asen_width == 85
    assert counts("tiny", "asen", asen_width=512)[:2] == (1_242_769, 267_009)  # ASEN's 512 kept: +32% on the backbone
    n, part, share, cfg = counts("mini", "cca")
    assert (n, part, cfg.grid, len(build_model(cfg).blocks)) == (686_672, 5 * 64 + 64 * 64 + 64, 8, 12)
    assert 0.005 < share < 0.01
    n, part, share, cfg = counts("mini", "asen")
    assert (n, part, cfg.asen_width) == (693_929, 11_737, 43) and 0.015 < share < 0.025
    for method in ("triplet", "csn"):
        assert counts("mini", method)[0] == 682_192 + (5 * 1024 if method == "csn" else 0)
    paper = counts("vit_r50_b16", "asen")
    assert paper[3].asen_width == 512 and round(100 * paper[2], 2) == 1.62


def test_state_dict_keys_and_shapes_match_timm_reference_list():
    model = CCA(CCAConfig(arch="vit_r50_b16"))
    sd = model.state_dict()
    ref = read_key_list("timm_vit_base_r50_s16_224_keys.txt")
    assert {k: tuple(sd[k].shape) for k in model.backbone_keys()} == ref


def test_shapes_and_unit_norm():
    model = tiny()
    x = torch.randn(3, 3, 64, 64)
    c = torch.tensor([0, 4, 2])
    f = model(x, c)
    assert f.shape == (3, 32)
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(3))
    assert model.trunk(x).shape == (3, 1 + 8 * 8, 128)
    assert model.embed_all(x).shape == (3, 5, 32)
    assert model.attention_maps(x, c).shape == (3, 4, 64)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown arch"):
        CCAConfig(arch="vit_huge")
    with pytest.raises(ValueError, match="condition_type"):
        CCAConfig(condition_type=3)
    for bad in (100, 0, -32):  # 0 and -32 are multiples of 16 too, but no image size
        with pytest.raises(ValueError, match=f"img_size must be a positive multiple of 16, the output stride of arch 'vit_r50_b16', got {bad}"):
            CCAConfig(img_size=bad)


# -----------------------------------------------------------------------------
# the equations against written-out forms


def naive_attention(q, k, v):
    """softmax(Q K^T / sqrt(d)) V written out, (B, heads, M, d) x (B, heads, N, d)."""
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v


def split_heads(x, heads):
    B, N, D = x.shape
    return x.reshape(B, N, heads, D // heads).permute(0, 2, 1, 3)


def test_self_attention_equals_naive_softmax():
    model = tiny()
    attn, heads = model.blocks[0].attn, ARCH_SIZES["tiny"]["num_heads"]
    x = torch.randn(2, 17, 128)
    q, k, v = (split_heads(t, heads) for t in (x @ attn.qkv.weight.t() + attn.qkv.bias).chunk(3, dim=-1))
    expected = naive_attention(q, k, v).permute(0, 2, 1, 3).reshape(2, 17, 128) @ attn.proj.weight.t() + attn.proj.bias
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def condition_token(model, c):
    """Eq. 2 with an explicit one-hot, eq. 3 with an explicit lookup, written out here."""
    cond = model.condition
    if model.cfg.condition_type == 1:
        onehot = F.one_hot(c, model.cfg.num_conditions).float()
        return onehot @ cond.fc.weight.t() + cond.fc.bias
    return torch.relu(cond.mask[c]) @ cond.fc.weight.t() + cond.fc.bias


def eq4_repeated_form(model, x_img, c):
    """The paper's form: q_c repeated to all N+1 positions (eq. 4), full cross-attention (eq. 6),
    residual and MLP on every token, [CLS] read out, FC and l2 (eq. 7). Keys and values of all 1+N tokens, or of
    the N patch tokens alone where the config says cls_key=False; no residual where it says cls_residual=False."""
    blk, heads = model.blocks[-1], model.cfg.sizes["num_heads"]
    x = model.trunk(x_img)  # (B, 1+N, D)
    B, T, D = x.shape
    Qc = condition_token(model, c)[:, None].expand(B, T, D)  # eq. 4
    W, b = blk.attn.qkv.weight, blk.attn.qkv.bias
    kv = x if model.cfg.cls_key else x[:, 1:]
    q = split_heads(blk.norm1(Qc) @ W[:D].t() + b[:D], heads)
    k = split_heads(blk.norm1(kv) @ W[D:2 * D].t() + b[D:2 * D], heads)
    v = split_heads(blk.norm1(kv) @ W[2 * D:].t() + b[2 * D:], heads)
    a = naive_attention(q, k, v).permute(0, 2, 1, 3).reshape(B, T, D)
    y = blk.attn.proj(a) + (x if model.cfg.cls_residual else 0)
    y = y + blk.mlp(blk.norm2(y))
    return F.normalize(model.head(model.norm(y)[:, 0]), dim=-1)


@pytest.mark.parametrize("condition_type,cls_key,cls_residual", [(1, True, True), (2, True, True), (2, False, True), (2, False, False)])
def test_single_query_equals_eq4_repeated_query(condition_type, cls_key, cls_residual):
    model = tiny(condition_type, cls_key=cls_key, cls_residual=cls_residual)
    x, c = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 3, 4])
    with torch.no_grad():
        torch.testing.assert_close(model(x, c), eq4_repeated_form(model, x, c), atol=1e-5, rtol=1e-5)
        if not cls_residual:  # the same weights with the residual give another embedding: the flag reaches block L
            model.cls_token.normal_()
            with_residual = tiny(condition_type, cls_key=cls_key)
            with_residual.load_state_dict(model.state_dict())
            assert (model(x, c) - with_residual(x, c)).norm(dim=-1).min() > 1e-2
        if not cls_key:  # the same weights with [CLS] among the keys give another embedding ([CLS] made distinct)
            model.cls_token.normal_()
            with_cls = tiny(condition_type)
            with_cls.load_state_dict(model.state_dict())
            assert (model(x, c) - with_cls(x, c)).norm(dim=-1).min() > 3e-4  # 1.1e-3 here; rounding ~1e-7


@pytest.mark.parametrize("condition_type", [1, 2])
def test_embed_all_equals_one_call_per_condition(condition_type):
    model = tiny(condition_type)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        together = model.embed_all(x)
        for k in range(5):
            torch.testing.assert_close(together[:, k], model(x, torch.full((3,), k)), atol=1e-5, rtol=1e-5)


def test_conditions_give_different_embeddings():
    # at initialisation q.k is small and the attention nearly uniform, whatever the query; sharpen the
    # last block's attention as pretrained weights would, then the condition must switch the output
    model = tiny()
    with torch.no_grad():
        model.blocks[-1].attn.qkv.weight.mul_(20)
        f = model.embed_all(torch.randn(2, 3, 64, 64))
    assert (f[:, 0] - f[:, 1]).norm(dim=-1).min() > 0.05


def test_attention_maps_are_the_softmax_weights_over_patches():
    model = tiny()
    x, c = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    blk, heads = model.blocks[-1], 4
    with torch.no_grad():
        maps = model.attention_maps(x, c)
        t = model.trunk(x)
        D = t.shape[-1]
        q = split_heads(blk.norm1(condition_token(model, c)[:, None]) @ blk.attn.qkv.weight[:D].t() + blk.attn.qkv.bias[:D], heads)
        k = split_heads(blk.norm1(t) @ blk.attn.qkv.weight[D:2 * D].t() + blk.attn.qkv.bias[D:2 * D], heads)
        w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // heads), dim=-1)[:, :, 0]  # (B, heads, 1+N)
    torch.testing.assert_close(maps, w[:, :, 1:], atol=1e-6, rtol=1e-5)
    assert (maps.sum(-1) <= 1 + 1e-6).all()
    # without [CLS] among the keys: the softmax over the N patches alone
    patches_only = tiny(cls_key=False)
    patches_only.load_state_dict(model.state_dict())
    with torch.no_grad():
        maps = patches_only.attention_maps(x, c)
    torch.testing.assert_close(maps, torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(D // heads))[:, :, 0, 1:], dim=-1), atol=1e-6, rtol=1e-5)


def test_bf16_autocast_on_cpu_runs_and_stays_close():
    model = tiny()
    x, c = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    with torch.no_grad():
        ref = model(x, c)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, c)
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bf16_autocast_on_cuda():
    model = tiny().cuda()
    x, c = torch.randn(4, 3, 64, 64, device="cuda"), torch.tensor([0, 1, 2, 3], device="cuda")
    with torch.no_grad():
        ref = model(x, c)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(x, c)
            all_ = model.embed_all(x)
    assert (low - ref).abs().max() < 0.1
    torch.testing.assert_close(all_[torch.arange(4), c], low, atol=2e-2, rtol=2e-2)


def test_timm_parity_of_the_trunk():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=0).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in ref.named_parameters():  # norms start as identity: make them count
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    path = os.path.join(os.environ.get("PYTEST_TMP", "/tmp"), f"timm_ref_{os.getpid()}.pth")
    torch.save(ref.state_dict(), path)
    try:
        model = CCA(CCAConfig(arch="vit_r50_b16", img_size=224)).eval()
        load_pretrained(model, path, verbose=False)
    finally:
        os.remove(path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        t = ref.norm_pre(ref._pos_embed(ref.patch_embed(x)))
        for blk in ref.blocks[:-1]:
            t = blk(t)
        ours = model.trunk(x)
    assert (ours - t).abs().max() < 1e-4
    # the cross-attention block starts from the last pretrained block
    for name, p in ref.blocks[-1].named_parameters():
        torch.testing.assert_close(model.blocks[-1].get_parameter(name), p)


# -----------------------------------------------------------------------------
# weight files in the real layouts, written by an inverse mapping of the test's own


def read_key_list(name):
    out = {}
    with open(os.path.join(FIXTURES, name)) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, shape = line.rstrip("\n").split("\t")
            out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def to_google(sd, cfg, gn_4d=True):
    """timm-named tensors -> Google's npz layout (the inverse of cca.google_to_timm's mapping)."""
    D, H = cfg.sizes["embed_dim"], cfg.sizes["num_heads"]
    n = lambda t: t.detach().numpy().astype(np.float32)  # noqa: E731
    gn = lambda t: n(t).reshape(1, 1, 1, -1) if gn_4d else n(t)  # noqa: E731
    hwio = lambda t: n(t.permute(2, 3, 1, 0))  # noqa: E731
    out = {"cls": n(sd["cls_token"]), "Transformer/posembed_input/pos_embedding": n(sd["pos_embed"]),
           "conv_root/kernel": hwio(sd["patch_embed.backbone.stem.conv.weight"]),
           "gn_root/scale": gn(sd["patch_embed.backbone.stem.norm.weight"]), "gn_root/bias": gn(sd["patch_embed.backbone.stem.norm.bias"]),
           "embedding/kernel": hwio(sd["patch_embed.proj.weight"]), "embedding/bias": n(sd["patch_embed.proj.bias"]),
           "Transformer/encoder_norm/scale": n(sd["norm.weight"]), "Transformer/encoder_norm/bias": n(sd["norm.bias"])}
    for key, t in sd.items():
        parts = key.split(".")
        if key.startswith("patch_embed.backbone.stages."):
            s, u, rest = int(parts[3]), int(parts[5]), parts[6:]
            unit = f"block{s + 1}/unit{u + 1}/"
            if rest[0] == "downsample":
                out[unit + ("conv_proj/kernel" if rest[1] == "conv" else f"gn_proj/{'scale' if rest[2] == 'weight' else 'bias'}")] = hwio(t) if rest[1] == "conv" else gn(t)
            elif rest[0].startswith("conv"):
                out[unit + f"{rest[0]}/kernel"] = hwio(t)
            else:
                out[unit + f"gn{rest[0][-1]}/{'scale' if rest[1] == 'weight' else 'bias'}"] = gn(t)
        elif key.startswith("blocks."):
            blk = f"Transformer/encoderblock_{parts[1]}/"
            att = blk + "MultiHeadDotProductAttention_1/"
            name = ".".join(parts[2:])
            if name == "attn.qkv.weight":
                for i, qkv in enumerate(("query", "key", "value")):
                    out[att + f"{qkv}/kernel"] = n(t[i * D:(i + 1) * D].t().reshape(D, H, D // H))
            elif name == "attn.qkv.bias":
                for i, qkv in enumerate(("query", "key", "value")):
                    out[att + f"{qkv}/bias"] = n(t[i * D:(i + 1) * D].reshape(H, D // H))
            elif name == "attn.proj.weight":
                out[att + "out/kernel"] = n(t.t().reshape(H, D // H, D))
            elif name == "attn.proj.bias":
                out[att + "out/bias"] = n(t)
            elif name.startswith("norm"):
                out[blk + f"LayerNorm_{0 if name[4] == '1' else 2}/{'scale' if name.endswith('weight') else 'bias'}"] = n(t)
            elif name.startswith("mlp.fc"):
                j = int(name[6]) - 1
                out[blk + f"MlpBlock_3/Dense_{j}/{'kernel' if name.endswith('weight') else 'bias'}"] = n(t.t()) if name.endswith("weight") else n(t)
    return out


def write_safetensors(path, tensors):
    """A safetensors writer of the test's own (the format: u64 header length, JSON header, raw data)."""
    header, blobs, offset = {}, [], 0
    for k, t in tensors.items():
        a = t.detach().contiguous().numpy()
        dtype = {np.float32: "F32", np.float16: "F16"}[a.dtype.type]
        header[k] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        blobs.append(a.tobytes())
        offset += a.nbytes
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def backbone_state(model):
    sd = model.state_dict()
    return {k: sd[k].clone() for k in model.backbone_keys()}


def assert_backbone_equal(model, sd):
    own = model.state_dict()
    for k, v in sd.items():
        torch.testing.assert_close(own[k], v.float(), msg=k)


def test_google_inverse_mapping_produces_the_real_key_list():
    model = CCA(CCAConfig(arch="vit_r50_b16"))
    google = {k: v.shape for k, v in to_google(backbone_state(model), model.cfg).items()}
    assert google == read_key_list("google_R50+ViT-B_16_npz_keys.txt")


@pytest.mark.parametrize("prefix,gn_4d", [("", True), ("opt/target/", False)])
def test_google_npz_loads_back(tmp_path, prefix, gn_4d):
    src = tiny(seed=1)
    sd = backbone_state(src)
    arrays = {prefix + k: v for k, v in to_google(sd, src.cfg, gn_4d).items()}
    arrays[prefix + "head/kernel"] = np.zeros((128, 10), np.float32)  # classifier heads are dropped
    arrays[prefix + "pre_logits/bias"] = np.zeros(128, np.float32)
    np.savez(tmp_path / "w.npz", **arrays)
    dst = tiny(seed=2)
    cond_before = dst.condition.mask.detach().clone()
    report = load_pretrained(dst, str(tmp_path / "w.npz"), verbose=False)
    assert_backbone_equal(dst, sd)
    torch.testing.assert_close(dst.condition.mask, cond_before)  # new parameters untouched
    assert set(report["new"]) == {"condition.mask", "condition.fc.weight", "condition.fc.bias", "head.weight", "head.bias"}
    assert report["dropped"] == ["head.weight", "pre_logits.fc.bias"] and report["ignored"] == []


def test_an_npz_saved_with_its_optimizer_state_loads_and_says_what_it_left(tmp_path, capsys):
    src = tiny(seed=1)
    sd = backbone_state(src)
    arrays = {"opt/target/" + k: v for k, v in to_google(sd, src.cfg).items()}
    arrays["opt/target/head/kernel"] = np.zeros((128, 10), np.float32)
    arrays["opt/target/head/bias"] = np.zeros(10, np.float32)
    state = {"opt/state/param_states/cls/grad_ema": np.zeros((1, 1, 128), np.float32), "opt/state/step": np.zeros((), np.int64)}
    np.savez(tmp_path / "w.npz", **arrays, **state)
    dst = tiny(seed=2)
    report = load_pretrained(dst, str(tmp_path / "w.npz"))
    assert_backbone_equal(dst, sd)
    assert report["ignored"] == sorted(state) and report["dropped"] == ["head.bias", "head.weight"]
    out = capsys.readouterr().out
    assert "dropped ['head.bias', 'head.weight']" in out and "dropped nothing" not in out
    assert "ignored 2 keys outside opt/target/" in out and "opt/state/step" in out


def test_timm_pth_and_safetensors_load_back(tmp_path):
    src = tiny(seed=1)
    sd = backbone_state(src)
    torch.save({**sd, "head.weight": torch.zeros(10, 128), "head.bias": torch.zeros(10)}, tmp_path / "pytorch_model.bin")
    write_safetensors(tmp_path / "model.safetensors", sd)
    write_safetensors(tmp_path / "half.safetensors", {k: v.half() for k, v in sd.items()})
    for name in ("pytorch_model.bin", "model.safetensors"):
        dst = tiny(seed=2)
        report = load_pretrained(dst, str(tmp_path / name), verbose=False)
        assert_backbone_equal(dst, sd)
        assert report["dropped"] == (["head.bias", "head.weight"] if name.endswith(".bin") else [])
    dst = tiny(seed=2)
    load_pretrained(dst, str(tmp_path / "half.safetensors"), verbose=False)
    assert_backbone_equal(dst, {k: v.half() for k, v in sd.items()})


def test_position_embedding_is_resized_on_its_grid(tmp_path):
    src = tiny(seed=1, img_size=64)  # 8 x 8 grid
    torch.save(backbone_state(src), tmp_path / "w.pth")
    dst = tiny(seed=2, img_size=96)  # 12 x 12 grid
    report = load_pretrained(dst, str(tmp_path / "w.pth"), verbose=False)
    assert report["resized"] == ["pos_embed"]
    pos = dst.pos_embed.detach()
    assert pos.shape == (1, 1 + 144, 128)
    torch.testing.assert_close(pos[:, 0], src.pos_embed[:, 0].detach())  # [CLS] kept apart
    # timm's resampling, bilinear without antialiasing, [CLS] the one prefix token: the same numbers, up and down, so
    # the grid is neither transposed nor shifted (the random grid has no symmetry that would hide either)
    pytest.importorskip("timm")
    from timm.layers import resample_abs_pos_embed

    grid = src.pos_embed.detach()
    timm_resize = lambda g: resample_abs_pos_embed(grid, [g, g], [8, 8], num_prefix_tokens=1, interpolation="bilinear", antialias=False)  # noqa: E731
    torch.testing.assert_close(pos, timm_resize(12), rtol=0, atol=1e-6)
    for g in (5, 8, 16):
        torch.testing.assert_close(resize_pos_embed(grid, g), timm_resize(g), rtol=0, atol=1e-6)
    transposed = torch.cat([grid[:, :1], grid[:, 1:].reshape(1, 8, 8, -1).transpose(1, 2).reshape(1, 64, -1)], 1)
    assert (resize_pos_embed(transposed, 12) - timm_resize(12)).abs().max() > 1e-3  # what the comparison would catch


def test_google_npz_loads_like_timms_own_loader(tmp_path, monkeypatch):
    """The npz mapping against an independent one: timm's _load_weights reading Google's layout into its
    vit_base_r50_s16_224. Random arrays with the names and shapes of the real key list: the R50 stem in full and
    blocks 0 and 1 of the 12 (blocks 2..11 map as block 1 does under another index, the key list test checks their
    names and shapes, and they would cost 70M parameters more)."""
    pytest.importorskip("timm")
    import timm
    from timm.models.vision_transformer import _load_weights

    depth = 2
    monkeypatch.setitem(ARCH_SIZES, "vit_r50_b16_depth2", dict(ARCH_SIZES["vit_r50_b16"], depth=depth))
    keys = {k: shape for k, shape in read_key_list("google_R50+ViT-B_16_npz_keys.txt").items()
            if not k.startswith("Transformer/encoderblock_") or int(k.split("/")[1].split("_")[1]) < depth}
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "w.npz", **{k: rng.standard_normal(shape, dtype=np.float32) for k, shape in keys.items()})
    with torch.device("meta"):  # no time spent initialising weights that the loaders overwrite
        ref = timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=0, depth=depth)
        ours = CCA(CCAConfig(arch="vit_r50_b16_depth2"))
    ref, ours = ref.to_empty(device="cpu"), ours.to_empty(device="cpu")
    _load_weights(ref, str(tmp_path / "w.npz"))
    load_pretrained(ours, str(tmp_path / "w.npz"), verbose=False)
    theirs, mine = ref.state_dict(), ours.state_dict()
    assert sorted(theirs) == sorted(ours.backbone_keys()) and len(theirs) == 186  # every tensor of timm's model
    for k in theirs:
        assert torch.equal(mine[k], theirs[k]), k


def test_convert_cli_round_trips(tmp_path):
    src = tiny(seed=1)
    sd = backbone_state(src)
    np.savez(tmp_path / "w.npz", **to_google(sd, src.cfg))
    out = tmp_path / "converted.pt"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "cca.py"), "convert", str(tmp_path / "w.npz"), str(out), "--arch", "tiny", "--img-size", "64"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["format"] == "cca-backbone" and ckpt["img_size"] == 64
    dst = tiny(seed=2)
    load_pretrained(dst, str(out), verbose=False)
    assert_backbone_equal(dst, sd)


# -----------------------------------------------------------------------------
# bad inputs


def test_truncated_files_give_clear_errors(tmp_path):
    src = tiny(seed=1)
    sd = backbone_state(src)
    np.savez(tmp_path / "w.npz", **to_google(sd, src.cfg))
    torch.save(sd, tmp_path / "w.pth")
    write_safetensors(tmp_path / "w.safetensors", sd)
    for name in ("w.npz", "w.pth", "w.safetensors"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / ("cut_" + name)).write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match="cut_" + name.replace(".", r"\.")):
            load_pretrained(tiny(), str(tmp_path / ("cut_" + name)), verbose=False)


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    sd = backbone_state(tiny(seed=1))
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 128)
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1\.weight.*\(100, 128\).*\(512, 128\)"):
        load_pretrained(tiny(), str(tmp_path / "w.pth"), verbose=False)


def test_missing_and_unknown_keys_and_formats(tmp_path):
    sd = backbone_state(tiny(seed=1))
    del sd["norm.bias"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing.pth.*norm.bias"):
        load_pretrained(tiny(), str(tmp_path / "missing.pth"), verbose=False)
    g = to_google(backbone_state(tiny(seed=1)), tiny().cfg)
    g["Transformer/encoderblock_99/LayerNorm_0/scale"] = np.zeros(128, np.float32)
    np.savez(tmp_path / "extra.npz", **g)
    with pytest.raises(ValueError, match="encoderblock_99"):
        load_pretrained(tiny(), str(tmp_path / "extra.npz"), verbose=False)
    (tmp_path / "w.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(ValueError, match="unknown weight format"):
        load_pretrained(tiny(), str(tmp_path / "w.onnx"), verbose=False)
    with pytest.raises(FileNotFoundError, match="nowhere.npz"):
        load_pretrained(tiny(), str(tmp_path / "nowhere.npz"), verbose=False)


# -----------------------------------------------------------------------------
# the comparison methods on the same backbone


def baseline(method, seed=0):
    torch.manual_seed(seed)
    model = build_model(CCAConfig(arch="tiny", num_conditions=5, img_size=64, out_dim=32, method=method))
    randomise_norms(model)
    return model.eval()


def test_a_class_refuses_a_config_of_another_method():
    from cca import Baseline
    with pytest.raises(ValueError, match="build_model"):
        CCA(CCAConfig(arch="tiny", num_conditions=3, img_size=32, method="csn"))
    with pytest.raises(ValueError, match="build_model"):
        Baseline(CCAConfig(arch="tiny", num_conditions=3, img_size=32, method="cca"))


def test_triplet_baseline_ignores_the_condition():
    model = baseline("triplet")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f0, f3 = model(x, torch.tensor([0, 0])), model(x, torch.tensor([3, 3]))
        all_ = model.embed_all(x)
    torch.testing.assert_close(f0, f3, rtol=0, atol=0)
    for k in range(5):
        torch.testing.assert_close(all_[:, k], f0, rtol=0, atol=0)


def test_csn_baseline_is_a_masked_embedding():
    model = baseline("csn")
    x, c = torch.randn(2, 3, 64, 64), torch.tensor([1, 4])
    with torch.no_grad():
        cls = model.norm(model.blocks[-1](model.trunk(x)))[:, 0]
        expected = F.normalize(model.head(cls) * torch.relu(model.condition.mask[c]), dim=-1)
        torch.testing.assert_close(model(x, c), expected, atol=1e-6, rtol=1e-5)
        all_ = model.embed_all(x)
    torch.testing.assert_close(all_[torch.arange(2), c], model(x, c), atol=1e-6, rtol=1e-5)
    assert (all_[:, 0] - all_[:, 1]).abs().max() > 1e-3


def test_asen_baseline_attends_per_condition():
    model = baseline("asen")
    x, c = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    with torch.no_grad():
        maps = model.attention_maps(x, c)
        all_ = model.embed_all(x)
        f = model(x, c)
    assert maps.shape == (2, 1, 64)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 1))
    torch.testing.assert_close(all_[torch.arange(2), c], f, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="no condition-dependent attention"):
        baseline("triplet").attention_maps(x, c)


def asenet_written_out(model, images, c):
    """ASEN's ASENet (Ma et al., AAAI 2020) on the last layer's tokens, from its equations with plain tensor ops:
    the tokens laid out as a (B, D, h, w) map, 1x1 convs as conv2d, the attribute as a one-hot times a matrix."""
    m = model.condition
    tokens = model.norm(model.blocks[-1](model.trunk(images)))[:, 1:]  # (B, N, D) after the final norm
    B, N, D = tokens.shape
    g = math.isqrt(N)
    fmap = tokens.transpose(1, 2).reshape(B, D, g, g)  # the patch grid as ASEN's feature map
    a = F.one_hot(c, model.cfg.num_conditions).float()  # (B, K)
    # spatial: tanh(conv1(I)) * tanh(mask_fc1(a)), conv2 to one channel, tanh, softmax over the h*w locations
    img = torch.tanh(F.conv2d(fmap, m.feat_proj.weight[:, :, None, None], m.feat_proj.bias))  # (B, 512, g, g)
    attr = torch.tanh(a @ m.attr_spatial.weight.t())  # (B, 512)
    logit = torch.tanh(F.conv2d(img * attr[:, :, None, None], m.score.weight[:, :, None, None], m.score.bias))  # (B, 1, g, g)
    att = torch.exp(logit.flatten(1)) / torch.exp(logit.flatten(1)).sum(1, keepdim=True)  # (B, g*g)
    v = (fmap * att.view(B, 1, g, g)).sum((2, 3))  # (B, D)
    # channel: ReLU(mask_fc2(a)) beside the pooled feature, fc1, ReLU, fc2, sigmoid, times the pooled feature
    q = torch.relu(a @ m.attr_channel.weight.t())
    fc1, fc2 = m.channel[0], m.channel[2]
    hidden = torch.relu(torch.cat([v, q], 1) @ fc1.weight.t() + fc1.bias)
    u = v * torch.sigmoid(hidden @ fc2.weight.t() + fc2.bias)
    f = u @ model.head.weight.t() + model.head.bias  # feature_fc
    return f / f.pow(2).sum(1, keepdim=True).sqrt(), att  # l2norm


def test_asen_equals_asenet_written_out():
    model = baseline("asen")
    x, c = torch.randn(3, 3, 64, 64), torch.tensor([0, 4, 2])
    with torch.no_grad():
        expected, att = asenet_written_out(model, x, c)
        torch.testing.assert_close(model(x, c), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.attention_maps(x, c)[:, 0], att, atol=1e-6, rtol=1e-5)
    # ASEN's widths: its 512 in the attention scaled with the width (85 at tiny's 128), the token width D where the feature is
    m, D = model.condition, model.cfg.sizes["embed_dim"]
    assert (m.feat_proj.out_features, m.attr_spatial.out_features, m.channel[0].out_features) == (85, 85, 85)
    assert (m.attr_channel.out_features, m.channel[2].out_features, m.channel[0].in_features) == (D, D, 2 * D)
    assert m.attr_spatial.bias is None and m.attr_channel.bias is None


def test_asen_spatial_attention_is_bounded_by_the_tanh():
    model = baseline("asen")
    m, N = model.condition, model.cfg.grid ** 2
    bound = math.e ** 2 / (math.e ** 2 + N - 1)  # tanh keeps every logit in [-1, 1]
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1e4)  # weights far beyond any trained value: every tanh saturates
        tokens, c = 10 * torch.randn(4, N, model.cfg.sizes["embed_dim"]), torch.tensor([0, 1, 2, 3])
        assert m.spatial(tokens, c).max() <= bound * (1 + 1e-6)
        # the bound is reached: one location opposite to all the others gets logit +1 and they -1, or the reverse
        m.feat_proj.bias.zero_()
        m.score.bias.zero_()
        tokens = torch.ones(4, N, tokens.shape[-1])
        tokens[:, 5] = -1
        s = torch.maximum(m.spatial(tokens, c)[:, 5], m.spatial(-tokens, c)[:, 5])
    torch.testing.assert_close(s, torch.full((4,), bound))


@pytest.mark.parametrize("method", ["triplet", "csn", "asen"])
def test_pretrained_backbone_loads_into_every_method(tmp_path, method):
    sd = backbone_state(tiny(seed=1))
    torch.save(sd, tmp_path / "w.pth")
    model = baseline(method, seed=2)
    report = load_pretrained(model, str(tmp_path / "w.pth"), verbose=False)
    assert_backbone_equal(model, sd)
    assert all(k.startswith(("condition.", "head.")) for k in report["new"])


# -----------------------------------------------------------------------------
# embed_and_penalty: every method's training embeddings and its own penalty


def triplet_batch(B=3, size=64, seed=0):
    """A triplet batch as train.py's train_step feeds it: images [anchors; positives; negatives], conditions c.repeat(3)."""
    g = torch.Generator().manual_seed(seed)
    a, p, n = (torch.randn(B, 3, size, size, generator=g) for _ in range(3))
    c = torch.randint(0, 5, (B,), generator=g)
    return torch.cat([a, p, n]), c.repeat(3), (a, p, n), c


def csn_penalty_written_out(model, parts, c, embed_reg, mask_reg):
    """CSN's regularisers (Veit et al., CVPR 2017) from their definition, every image embedded on its own: per part t of
    the triplet, E_t (B, d) the unmasked embeddings FC(x_cls); embed_reg * mean_t ||E_t||_F / sqrt(B) plus mask_reg *
    mean_t ||ReLU(M[c])||_1 / B."""
    B = c.shape[0]
    norms, l1s = [], []
    for images in parts:  # anchors, positives, negatives
        E = torch.stack([model.head(model.norm(model.blocks[-1](model.trunk(images[i:i + 1])))[0, 0]) for i in range(B)])
        masks = torch.relu(model.condition.mask[c])  # (B, d): the mask of each image's condition
        norms.append(E.double().pow(2).sum().sqrt() / math.sqrt(B))
        l1s.append(masks.double().abs().sum() / B)
    return embed_reg * sum(norms) / 3 + mask_reg * sum(l1s) / 3


def test_csn_penalty_is_csns_regularisers_written_out():
    from cca import CSN_PENALTY
    model = baseline("csn")
    x, c3, parts, c = triplet_batch()
    part = model.condition
    assert (part.embed_reg, part.mask_reg) == (CSN_PENALTY["embed_reg"], CSN_PENALTY["mask_reg"]) == (5e-3, 5e-4)  # CSN's defaults
    # the penalty weights are plain attributes: the state dict holds the mask alone
    assert sorted(k for k in model.state_dict() if k.startswith("condition.")) == ["condition.mask"]
    with torch.no_grad():
        f, penalty = model.embed_and_penalty(x, c3)
        assert torch.equal(f, model(x, c3))  # the embeddings are forward's, bit for bit
        assert penalty.shape == () and penalty.dtype == torch.float32 and penalty.device == f.device
        for w in ((5e-3, 5e-4), (5e-3, 0.0), (0.0, 5e-4), (1.0, 2.0)):  # both terms, each alone, other weights
            part.embed_reg, part.mask_reg = w
            want = csn_penalty_written_out(model, parts, c, *w)
            torch.testing.assert_close(model.embed_and_penalty(x, c3)[1].double(), want, rtol=1e-5, atol=0)
        part.embed_reg = part.mask_reg = 0.0
        assert torch.equal(model.embed_and_penalty(x, c3)[1], torch.zeros(()))  # 0 switches both off: exactly zero


@pytest.mark.parametrize("method,condition_type", [("cca", 1), ("cca", 2), ("triplet", 2), ("asen", 2)])
def test_embed_and_penalty_is_forward_and_zero_for_the_other_methods(method, condition_type):
    torch.manual_seed(0)
    model = build_model(CCAConfig(arch="tiny", num_conditions=5, img_size=64, out_dim=32, method=method, condition_type=condition_type))
    randomise_norms(model)
    x, c3, _, _ = triplet_batch()
    for mode in (model.eval, model.train):
        mode()
        with torch.no_grad():
            f, penalty = model.embed_and_penalty(x, c3)
            assert torch.equal(f, model(x, c3))
        assert penalty.shape == () and penalty.dtype == torch.float32 and penalty.device == f.device
        assert torch.equal(penalty, torch.zeros(()))


def test_csn_penalty_gradient_reaches_the_mask_and_the_head():
    model = baseline("csn")
    x, c3, _, c = triplet_batch(B=4)
    B, mask = c.shape[0], model.condition.mask
    for embed_reg, mask_reg in ((5e-3, 0.0), (0.0, 5e-4), (5e-3, 5e-4)):
        model.zero_grad(set_to_none=True)
        model.condition.embed_reg, model.condition.mask_reg = embed_reg, mask_reg
        model.embed_and_penalty(x, c3)[1].backward()
        # the embedding term reaches the head (and through FC(x_cls) the backbone), the L1 term the mask
        assert (model.head.weight.grad.abs().sum() > 0) == (embed_reg > 0)
        assert (model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0) == (embed_reg > 0)
        assert (mask.grad.abs().sum() > 0) == (mask_reg > 0)
        # d/dM[k, j] of mask_reg * ||ReLU(M[c])||_1 / B: mask_reg * (the batch's triplets of condition k) / B where M > 0
        want = mask_reg * c.bincount(minlength=5)[:, None].float() / B * (mask.detach() > 0)
        torch.testing.assert_close(mask.grad, want, rtol=1e-6, atol=0)


def test_forward_has_no_csn_parts_and_csn_has_no_attention_map():
    model = baseline("csn")
    x, c = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    with pytest.raises(TypeError):
        model(x, c, csn_parts=True)
    with pytest.raises(ValueError, match="method 'csn' has no condition-dependent attention"):
        model.attention_maps(x, c)
    assert not any(k.startswith("condition.") for k in baseline("triplet").state_dict())  # the Triplet network's part has no weights
